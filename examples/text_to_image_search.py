"""Text -> image search with mmembed and Qdrant (local mode: no Qdrant server needed).

    pip install openai qdrant-client
    export MMEMBED_URL=http://127.0.0.1:8000 MMEMBED_KEY=your-key
    python examples/text_to_image_search.py "a photo of a cat" cat.jpg coffee.png rocket.jpg

Images are embedded through mmembed's OpenAI-compatible route (as data: URIs, so they never
need a public URL), stored in a Qdrant collection, and searched with the text's vector.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import sys

from openai import OpenAI
from qdrant_client import QdrantClient, models

MODEL = "tongyi-embedding-vision-plus"
DIMENSION = 512


def data_uri(path: str) -> str:
    kind = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{kind};base64,{base64.b64encode(f.read()).decode()}"


def main(query: str, paths: list[str]) -> None:
    base = os.environ.get("MMEMBED_URL", "http://127.0.0.1:8000")
    client = OpenAI(base_url=f"{base}/v1", api_key=os.environ.get("MMEMBED_KEY", "local"))

    # Index: one vector per image. The input list may mix strings (texts) and DashScope
    # content objects such as {"image": ...}; the openai SDK passes them through.
    images = [{"image": data_uri(p)} for p in paths]
    vectors = client.embeddings.create(model=MODEL, input=images, dimensions=DIMENSION)  # type: ignore[arg-type]
    store = QdrantClient(":memory:")
    store.create_collection(
        "images",
        vectors_config=models.VectorParams(size=DIMENSION, distance=models.Distance.COSINE),
    )
    store.upsert(
        "images",
        points=[
            models.PointStruct(id=i, vector=item.embedding, payload={"path": path})
            for i, (item, path) in enumerate(zip(vectors.data, paths, strict=True))
        ],
    )

    # Search: the text's vector, in the same space.
    (hit,) = client.embeddings.create(model=MODEL, input=query, dimensions=DIMENSION).data
    found = store.query_points("images", query=hit.embedding, limit=len(paths)).points
    for rank, point in enumerate(found, 1):
        print(f"{rank}. {point.score:.4f}  {point.payload['path']}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
