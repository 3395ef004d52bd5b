"""The fallback peer for serve_load.py: a plain FastAPI + sentence-transformers embeddings server.

What a user would write without Ray Serve: one uvicorn process, ``model.encode(texts)`` per request
(no cross-request batching), an OpenAI-shaped ``POST /v1/embeddings``. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from pydantic import BaseModel
    from sentence_transformers import SentenceTransformer

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    model = SentenceTransformer(args.model, device="cpu")
    app = FastAPI()

    class Body(BaseModel):
        model: str
        input: str | list[str]
        encoding_format: str = "float"

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    async def embeddings(body: Body) -> dict:
        texts = [body.input] if isinstance(body.input, str) else body.input
        vectors = await run_in_threadpool(model.encode, texts, normalize_embeddings=True)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
            "model": body.model,
        }

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
