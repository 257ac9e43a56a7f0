"""tandem's HTTP server: OpenAI- and ollama-compatible APIs over the engine.

app.py            create_app() (FastAPI + lifespan), serve() on uvicorn, /health, /metrics
state.py          what the handlers share
models.py         ModelRegistry: name -> LoadedModel + Engine, keep-alive, what `ps` shows
stream.py         RequestStream: engine thread -> asyncio.Queue, abort on disconnect
openai_*.py       /v1/chat/completions, /v1/completions, /v1/models
ollama_*.py       /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version
choice.py         one sample's accumulated output and logprob shapes
metrics.py        Prometheus text
errors.py         TandemError -> HTTP status and error bodies
keep_alive.py     ollama keep_alive durations
guard.py          Host, Origin, content type and body size of every request; last-resort 500
limits.py         what one request may ask (n, stops, prompt length); see docs/hardening.md
"""
