"""Build the baseline weight model, `models/weights/weight_baseline.onnx`, deterministically.

    python -m workers.dev.build_model [--out PATH]

No training and no download: the graph segments the bird from the background
(luminance above a threshold: a bright bird on a dark floor, as under the
WeighVision station's lights), takes its projected area and maps it to a
weight with an allometric law, w = a * area^b. The constants are initializers,
so another calibration is another file built by this script with other
numbers; the model version travels in the ONNX metadata (`model_version`).

Contract (README, "Weight model"): input `image`, float32 [N, 3, H, W], RGB,
values in [0, 1] (pixel / 255), any N, H, W; outputs `predicted_weight_kg`
[N], `confidence` [N] in [0, 1], `predicted_size` [N] (projected area, cm²).
"""

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODEL_VERSION = "farmiq-area-allometric-1.0.0"
OUT = Path(__file__).resolve().parents[2] / "models" / "weights" / "weight_baseline.onnx"
OPSET = 17

# Calibration of the baseline: the camera sees FIELD_AREA_CM2 of floor; a bird
# covering `area` cm² weighs A * area ** B kg (a 2 kg broiler shows ~520 cm²).
LUMA = (0.299, 0.587, 0.114)
THRESHOLD = 0.5
FIELD_AREA_CM2 = 4800.0
A = 1.8e-4
B = 1.5
EPS = 1e-6


def reference_weight(area_fraction: float | np.ndarray) -> np.ndarray:
    """The law in NumPy (tests compare the model with it)."""
    area = np.asarray(area_fraction, dtype=np.float64) * FIELD_AREA_CM2
    return A * area ** B


def build() -> onnx.ModelProto:
    init = [
        numpy_helper.from_array(np.array(LUMA, np.float32).reshape(1, 3, 1, 1), "luma_weights"),
        numpy_helper.from_array(np.array(THRESHOLD, np.float32), "threshold"),
        numpy_helper.from_array(np.array(FIELD_AREA_CM2, np.float32), "field_area_cm2"),
        numpy_helper.from_array(np.array(A, np.float32), "law_a"),
        numpy_helper.from_array(np.array(B, np.float32), "law_b"),
        numpy_helper.from_array(np.array(EPS, np.float32), "eps"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    axes = [1, 2, 3]
    nodes = [
        # Segmentation: luminance, then bird = brighter than the threshold.
        helper.make_node("Conv", ["image", "luma_weights"], ["luma"], kernel_shape=[1, 1]),
        helper.make_node("Greater", ["luma", "threshold"], ["bird"]),
        helper.make_node("Cast", ["bird"], ["mask"], to=TensorProto.FLOAT),
        # Projected area: share of the frame, times the field of view.
        helper.make_node("ReduceMean", ["mask"], ["fraction"], axes=axes, keepdims=0),
        helper.make_node("Mul", ["fraction", "field_area_cm2"], ["predicted_size"]),
        # Allometric law w = a * area^b.
        helper.make_node("Pow", ["predicted_size", "law_b"], ["area_pow"]),
        helper.make_node("Mul", ["law_a", "area_pow"], ["predicted_weight_kg"]),
        # Confidence: luminance contrast between bird and background, in [0, 1]
        # (no bird, or a washed-out frame, gives 0).
        helper.make_node("Mul", ["luma", "mask"], ["luma_bird"]),
        helper.make_node("ReduceMean", ["luma_bird"], ["bird_sum"], axes=axes, keepdims=0),
        helper.make_node("Max", ["fraction", "eps"], ["bird_share"]),
        helper.make_node("Div", ["bird_sum", "bird_share"], ["bird_mean"]),
        helper.make_node("ReduceMean", ["luma"], ["luma_all"], axes=axes, keepdims=0),
        helper.make_node("Sub", ["luma_all", "bird_sum"], ["floor_sum"]),
        helper.make_node("Sub", ["one", "fraction"], ["floor_share_raw"]),
        helper.make_node("Max", ["floor_share_raw", "eps"], ["floor_share"]),
        helper.make_node("Div", ["floor_sum", "floor_share"], ["floor_mean"]),
        helper.make_node("Sub", ["bird_mean", "floor_mean"], ["contrast"]),
        helper.make_node("Clip", ["contrast", "zero", "one"], ["confidence"]),
    ]
    graph = helper.make_graph(
        nodes, "weight_baseline",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"])
         for name in ("predicted_weight_kg", "confidence", "predicted_size")],
        init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="farmiq-edge workers/dev/build_model.py",
                              producer_version=MODEL_VERSION, ir_version=8,
                              doc_string="Bird segmentation by luminance; weight = a * area^b.")
    helper.set_model_props(model, {"model_version": MODEL_VERSION})
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(build().SerializeToString(deterministic=True))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {MODEL_VERSION})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
