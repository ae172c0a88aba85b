"""The winner written out: its final fine-tune, model.pt and plan.json, ONNX, TorchScript and int8 copies."""

from autoprune.export.final import export, finetune
from autoprune.export.formats import FORMATS, quantize_dynamic, to_onnx, to_torchscript

__all__ = ["export", "finetune", "FORMATS", "quantize_dynamic", "to_onnx", "to_torchscript"]


def __getattr__(name: str):  # autoprune.export was a module; its other names still resolve
    from autoprune._moved import old_attribute

    return old_attribute(__name__, name)
