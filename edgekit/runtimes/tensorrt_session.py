"""Running a deserialized TensorRT engine: shapes per batch, device buffers, CUDA-event timing.

One stream; page-locked host staging buffers and device buffers grown on demand. ``timed_run`` reports
the host-to-device copy, the engine's compute and the device-to-host copy separately, measured with CUDA
events on the stream (what optimum-benchmark does on GPU), so a fast engine starved by PCIe shows as such.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.runtimes.base import Session


def open_engine(trt, engine_path: Path):
    """(runtime, engine, context, input names, output names) for a serialized engine file.

    The runtime is returned so that the caller keeps it alive as long as the engine it deserialized.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise EdgekitError(f"TensorRT could not load {engine_path} (its log above says why)",
                           "rebuild the engine on this machine with edgekit engine build")
    context = engine.create_execution_context()
    if context is None:  # TensorRT returns None when it cannot allocate the context's activation memory
        raise EdgekitError(f"TensorRT could not create an execution context for {engine_path}: the GPU memory "
                           "left cannot hold its activations, which are sized for the largest shapes of the "
                           "engine's profile",
                           "rebuild the engine with a smaller --batch/--seq maximum (or a smaller --workspace-mb), "
                           "or free GPU memory")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    return runtime, engine, context, inputs, outputs


class TrtSession(Session):
    """A TensorRT engine behind Session; also ``timed_run`` (CUDA events) and ``device_info``."""

    def _setup(self):
        if "timer" in self.info:
            return
        from edgekit.runtimes.cuda_rt import Buffer, StreamTimer

        trt, engine = self.info["trt"], self.info["engine"]
        self.info["timer"] = StreamTimer()
        self.info["buffers"] = {n: Buffer() for n in self.input_names + self.info["outputs"]}
        self.info["dtypes"] = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
                               for n in self.input_names + self.info["outputs"]}
        # Profile 0 is the only one edgekit builds: (min, opt, max) per dynamic input.
        self.info["ranges"] = {n: [tuple(s) for s in engine.get_tensor_profile_shape(n, 0)] for n in self.input_names}

    def _check_shape(self, name: str, shape: tuple) -> None:
        lo, _, hi = self.info["ranges"][name]
        if len(shape) != len(lo) or any(not (a <= d <= b) for d, a, b in zip(shape, lo, hi)):
            dims = "x".join(map(str, shape))
            raise EdgekitError(
                f"a batch of shape {dims} for {name} is outside the engine's profile "
                f"({'x'.join(map(str, lo))} to {'x'.join(map(str, hi))})",
                "use a smaller --batch-size or shorter sequences, or rebuild the engine with wider --batch/--seq ranges")

    def prepare(self, inputs: dict) -> dict:
        self._setup()  # the engine's dtypes and profile ranges, which the base prepare and the check read
        prepared = super().prepare(inputs)
        for name in self.input_names:
            self._check_shape(name, prepared[name].shape)
        return prepared

    def _infer(self, prepared: dict):
        # Shapes, the staging copy and the addresses stay here: the buffers are shared by every batch.
        ctx, timer, buffers, dtypes = self.info["context"], self.info["timer"], self.info["buffers"], self.info["dtypes"]
        staged = []
        for name in self.input_names:
            arr = prepared[name]
            if not ctx.set_input_shape(name, arr.shape):
                raise EdgekitError(f"TensorRT refused the shape {arr.shape} for {name}", "check the engine's profile")
            buf = buffers[name]
            buf.ensure(max(arr.nbytes, 1))
            buf.host_view(arr.nbytes)[:] = arr.view(np.uint8).reshape(-1)
            staged.append((buf, arr.nbytes))
        out_shape = None
        for name in self.info["outputs"]:
            shape = tuple(ctx.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * dtypes[name].itemsize
            buffers[name].ensure(max(nbytes, 1))
            if name == self.output_name:
                out_shape, out_bytes = shape, nbytes
        for name, buf in buffers.items():
            ctx.set_tensor_address(name, buf.device)
        timer.mark(0)
        for buf, nbytes in staged:
            timer.copy(buf.device, buf.host, nbytes, to_device=True)
        timer.mark(1)
        if not ctx.execute_async_v3(timer.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (its log above says why)")
        timer.mark(2)
        out = buffers[self.output_name]
        timer.copy(out.host, out.device, out_bytes, to_device=False)
        timer.mark(3)
        phases = timer.finish()
        raw = out.host_view(out_bytes).view(dtypes[self.output_name]).reshape(out_shape)
        return raw.astype(np.float32, copy=True), phases  # copy: the staging buffer is reused next call

    def _run(self, inputs: dict):
        return self._infer(inputs)[0]

    def timed_run(self, inputs: dict) -> dict:
        """Run once; return {'h2d_ms', 'compute_ms', 'd2h_ms'} from CUDA events."""
        return self.timed_run_prepared(self.prepare(inputs))

    def timed_run_prepared(self, prepared: dict) -> dict:
        return self._infer(prepared)[1]

    def device_info(self) -> dict:
        from edgekit.runtimes.cuda_rt import memory_used_bytes

        return {"timing": "cuda-events", "activation_bytes": self.info.get("activation_bytes"),
                "engine_bytes": Path(self.path).stat().st_size, "cuda_memory_used_bytes": memory_used_bytes(),
                "engine_warnings": self.info.get("warnings", [])}

    def close(self) -> None:
        for buf in self.info.get("buffers", {}).values():
            buf.free()
        if "timer" in self.info:
            self.info.pop("timer").close()
