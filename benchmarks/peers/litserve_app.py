"""(c) LitServe with its batching: max_batch_size 64, batch_timeout 5 ms, PEER_WORKERS inference workers (and,
LitServe's default, as many API server processes), POST /classify.

decode_request without a type annotation gets the Starlette request's form (litserve/server.py,
_prepare_request: `await request.form()` for multipart), so `request["images"]` is an UploadFile held in memory
(LitServe lifts Starlette's spool limit so that it pickles into the worker queue).

    PEER_MODEL=... PEER_CARD=... PEER_WORKERS=2 PEER_PORT=8002 .venv-peers/bin/python benchmarks/peers/litserve_app.py
"""

from __future__ import annotations

import os

import litserve as ls
import numpy as np

import common


class CnnLitAPI(ls.LitAPI):
    def setup(self, device) -> None:
        self.session, self.labels = common.load_session(), common.load_labels()

    def decode_request(self, request):
        return common.decode_png(request["images"].file.read())

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, pixels):
        return common.classify(self.session, self.labels, pixels)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"predictions": [output]}


if __name__ == "__main__":
    api = CnnLitAPI(max_batch_size=64, batch_timeout=0.005, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=int(os.environ.get("PEER_WORKERS", "1")))
    server.run(host="127.0.0.1", port=int(os.environ["PEER_PORT"]), log_level="warning", generate_client_file=False)
