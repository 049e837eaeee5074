"""The weight model: one onnxruntime session per process, loaded once, and its input rule.

Contract (README, "Weight model"): input `image` float32 [N, 3, H, W], RGB in
[0, 1]; outputs `predicted_weight_kg` [N], `confidence` [N], optional
`predicted_size` [N]; metadata `model_version`. EDGE_MODEL_PATH selects
another file; the default is the baseline built by workers/dev/build_model.py.
"""

import io
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

BASELINE = Path(__file__).resolve().parents[1] / "models" / "weights" / "weight_baseline.onnx"
OUTPUTS = ("predicted_weight_kg", "confidence", "predicted_size")


@dataclass(frozen=True)
class Prediction:
    weight_kg: float
    confidence: float
    size: float | None


class WeightModel:
    def __init__(self, path: str | Path = "", threads: int = 2) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No busy-waiting between runs: on a 2-core box shared with the bridge,
        # PostgreSQL and the other workers, spinning threads only steal CPU
        # (measured: same frames/s, half the CPU per frame).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = Path(path or BASELINE)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if not meta.get("model_version"):
            raise ValueError(f"{self.path}: no model_version in the ONNX metadata")
        self.version = meta["model_version"]
        names = {o.name for o in self.session.get_outputs()}
        missing = {"predicted_weight_kg", "confidence"} - names
        if missing or [i.name for i in self.session.get_inputs()] != ["image"]:
            raise ValueError(f"{self.path}: not the weight-model contract (input image; outputs "
                             f"predicted_weight_kg, confidence[, predicted_size])")
        self.outputs = [o for o in OUTPUTS if o in names]

    def predict(self, batch: np.ndarray) -> list[Prediction]:
        """`batch`: float32 [N, 3, H, W] in [0, 1]."""
        values = dict(zip(self.outputs, self.session.run(self.outputs, {"image": batch})))
        sizes = values.get("predicted_size")
        return [Prediction(float(w), float(c), None if sizes is None else float(sizes[i]))
                for i, (w, c) in enumerate(zip(values["predicted_weight_kg"], values["confidence"]))]


def to_input(data: bytes) -> np.ndarray:
    """Encoded image bytes -> [3, H, W] float32 RGB in [0, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return (pixels * (1 / 255)).transpose(2, 0, 1)


_loaded: dict[tuple[str, int], WeightModel] = {}
_lock = threading.Lock()


def get_model(path: str = "", threads: int = 2) -> WeightModel:
    """The process's session (worker threads share it: onnxruntime's run is thread-safe)."""
    with _lock:
        key = (path, threads)
        if key not in _loaded:
            _loaded[key] = WeightModel(path, threads)
        return _loaded[key]
