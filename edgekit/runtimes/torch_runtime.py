"""PyTorch eager FP32: the reference every compressed model is compared with."""

from __future__ import annotations

from edgekit.errors import EdgekitError
from edgekit.runtimes.base import Session


class TorchSession(Session):
    def prepare(self, inputs):
        import torch

        return {k: torch.from_numpy(v) for k, v in super().prepare(inputs).items()}

    def _run(self, inputs):
        import torch

        with torch.inference_mode():
            out = self.info["model"](**inputs)
        return getattr(out, self.output_name).float().numpy()


def load_torch(path, device="cpu", threads=None, task=None) -> TorchSession:
    import torch

    from edgekit.checkpoint import load_model, open_checkpoint

    if device != "cpu":
        raise EdgekitError(f"the torch runtime here runs on the CPU only, not '{device}'", "use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    ckpt = open_checkpoint(path, task)  # an opened Checkpoint is not read again
    model = load_model(ckpt)
    import inspect

    accepted = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
    return TorchSession("torch-fp32", ckpt.path, ckpt.task.name, names, ckpt.task.output, device, threads,
                        {"model": model})
