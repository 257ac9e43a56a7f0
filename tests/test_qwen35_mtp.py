"""Qwen3.5's multi-token-prediction (MTP) blocks: a file that carries them (llama.cpp's
nextn_predict_layers, blk.{n_layer}.nextn.* as its converter writes Qwen3.5's mtp.* weights)
loads, its MTP block's tensors are shape-checked, never read nor run, and it gives exactly
the logits of the same file without them; the planner leaves the block's bytes out."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import load_script

from kernels import native_loader
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from quant.errors import GGUFError, UnsupportedError
from runtime.execution.model_runner import ModelRunner
from runtime.kv.forward_batch import ForwardBatch
from runtime.loaded_model import LoadedModel
from runtime.placement.model_sizes import ModelSizes
from runtime.run_options import RunOptions

pytestmark = pytest.mark.skipif(
    not native_loader.available(), reason="the native CPU kernel is not built here"
)
PROMPT = [5, 17, 300, 41, 9, 77, 1200, 8, 8, 2048, 3]
ARCHS = ("qwen35", "qwen35moe")


@pytest.fixture(scope="module", params=ARCHS)
def files(request, smollm2_path, tmp_path_factory):
    """(without, with one MTP block): the same seed, the same weights."""
    make = load_script("make_synthetic_gguf")
    entry = make.ARCHITECTURES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    paths = []
    for nextn in (0, 1):
        path = out / f"{request.param}-mtp{nextn}.gguf"
        dims = replace(entry.dims, nextn=nextn)
        make.make_arch(path, entry, make.TYPES["q8_0"], smollm2_path, dims, 0)
        paths.append(path)
    return paths


def logits(path, read: set[str] | None = None) -> torch.Tensor:
    """The prompt's logits at every position after a prefill, then one decode step; `read`
    gets the names of the tensors the model took from the file."""
    lm = LoadedModel.load(path, options=RunOptions.resolve(flags={"num_thread": 2}))
    if read is not None:
        read |= lm.gguf._handed  # pyright: ignore[reportPrivateUsage]
    runner = ModelRunner(lm.model, 1)
    with torch.inference_mode():
        first = runner.run(ForwardBatch.build([(PROMPT, 0, [0], True)], [0]))
        nxt = int(first[-1].argmax())
        second = runner.run(ForwardBatch.build([([nxt], len(PROMPT), [0], True)], [0]))
    return torch.cat([first, second])


def test_the_mtp_block_is_in_the_file_and_not_a_decoder_layer(files):
    plain, mtp = (GGUFFile(p) for p in files)
    arch = mtp.metadata["general.architecture"]
    assert mtp.metadata[f"{arch}.block_count"] == 5
    assert mtp.metadata[f"{arch}.nextn_predict_layers"] == 1
    extra = sorted(set(mtp.tensors) - set(plain.tensors))
    assert "blk.4.nextn.eh_proj.weight" in extra and "blk.4.attn_q.weight" in extra
    assert all(name.startswith("blk.4.") for name in extra)
    for name in plain.tensors:  # every other tensor: the same bytes
        assert torch.equal(mtp.tensor_bytes(name), plain.tensor_bytes(name)), name
    config = ModelConfig.from_metadata(mtp.metadata, mtp.tensors.keys())
    assert (config.n_layer, config.n_layer_nextn) == (4, 1)
    assert (
        config.recurrent_layers
        == ModelConfig.from_metadata(plain.metadata, plain.tensors.keys()).recurrent_layers
    )


def test_a_file_with_mtp_gives_the_logits_of_one_without(files):
    read: set[str] = set()
    without, with_mtp = logits(files[0]), logits(files[1], read)
    assert torch.equal(with_mtp, without)
    # the MTP block is never read: once the model is built (GGUFFile.detach) its pages are
    # untouched zero pages that cost no memory
    assert read and not any(name.startswith("blk.4.") for name in read)


def test_the_planner_leaves_the_mtp_block_out(files):
    plain, mtp = (GGUFFile(p) for p in files)
    sizes = [
        ModelSizes.from_tensors(ModelConfig.from_metadata(g.metadata, g.tensors.keys()), g.tensors)
        for g in (plain, mtp)
    ]
    assert sizes[1].total_bytes == sizes[0].total_bytes
    block = sum(t.nbytes for n, t in mtp.tensors.items() if n.startswith("blk.4."))
    assert sizes[1].nextn_bytes == block > 0
    assert sizes[0].nextn_bytes == 0


def test_a_misshapen_mtp_tensor_is_refused(files):
    g = GGUFFile(files[1])
    tensors = dict(g.tensors)
    name = "blk.4.nextn.eh_proj.weight"
    tensors[name] = replace(tensors[name], shape=(256, 256))
    with pytest.raises(GGUFError, match=r"blk\.4\.nextn\.eh_proj\.weight.*\[512, 256\]"):
        ModelConfig.from_metadata(g.metadata, tensors)
    del tensors[name]
    with pytest.raises(GGUFError, match=r"'blk\.4\.nextn\.eh_proj\.weight' is missing"):
        ModelConfig.from_metadata(g.metadata, tensors)


def test_an_mtp_only_file_is_refused(files):
    g = GGUFFile(files[1])
    arch = g.metadata["general.architecture"]
    md = {**g.metadata, f"{arch}.nextn_predict_layers": 5}
    with pytest.raises(UnsupportedError, match="MTP-only file"):
        ModelConfig.from_metadata(md, g.tensors.keys())
