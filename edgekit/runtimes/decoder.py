"""Decoder language models with a KV cache, behind one small interface for the ONNX graph and the original.

``DecoderSession.forward(ids, mask, past) -> (logits, past)`` is the one call: a prefill is a forward with an
empty cache, a decode step a forward of one token with the cache it returned. Export's validation, verify
(perplexity, next-token agreement, greedy generation), ``edgekit generate`` and the decoder benchmark all go
through it, so what is verified is how the model runs when it ships.

The ONNX side is the graph optimum-onnx writes for ``text-generation-with-past``: inputs ``input_ids``,
``attention_mask``, (``position_ids``,) ``past_key_values.N.key/value`` of shape [batch, kv_heads, past, head_dim];
outputs ``logits`` and ``present.N.key/value``. Written here rather than through Optimum's
``ORTModelForCausalLM`` because that class runs generation through torch tensors and transformers'
``generate``, so a benchmark could not time the runtime's call alone; the tests load the same folders with
``ORTModelForCausalLM`` to show that a client no one here wrote reads them.

On the CPU, a graph whose attention is onnxruntime's GroupQueryAttention (onnxruntime-genai's builder format,
``export --exporter genai``) decodes with its past and present bound to one buffer of a fixed capacity
(``SharedCache``): the kernel appends the new token's keys and values in place, instead of copying the whole
cache into a new present tensor at every step, as onnxruntime-genai's own runtime does
(``past_present_share_buffer``).

On a GPU (onnxruntime's CUDA or TensorRT provider) the cache never leaves the device: each step binds the
previous step's ``present`` OrtValues as its ``past`` inputs through IOBinding, and only the logits come back
to the host, where the next token is chosen. The step is timed on the host around synchronous calls, as the
encoder GPU path does (onnxruntime gives Python no CUDA events).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.runtimes.base import ONNX_NAME, onnx_file

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
# An optional graph input (an initializer of value 0 that a caller may override, transformers' forward argument of
# the same name): how many of the last positions get logits; 0, the default, is every position.
LOGITS_TO_KEEP = "logits_to_keep"
# A GPU session given no run lengths (verify, generate) is profiled for the model's context, or for this many
# tokens where the model does not say.
DEFAULT_GPU_CONTEXT = 2048
GPU_MEMORY = "cuda"  # where a GPU session keeps its cache (onnxruntime's OrtValue device name)


def position_ids(mask: np.ndarray, new: int) -> np.ndarray:
    """Positions of the last ``new`` tokens under ``mask`` (left padding counts no position), as transformers'
    generate computes them."""
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return pos[:, -new:].astype(np.int64)


class DecoderSession(abc.ABC):
    """What every decoder runtime provides (OrtDecoder, TorchDecoder)."""

    name: str
    vocab_size: int
    max_positions: int | None

    @abc.abstractmethod
    def forward(self, ids: np.ndarray, mask: np.ndarray, past, last_only: bool = False):
        """(logits [batch, new tokens, vocab], the cache to pass to the next call). ``last_only``: the caller
        reads only the last position's logits, which a runtime may then return alone ([batch, 1, vocab])."""

    def empty_past(self, batch: int):
        return None


@dataclass(frozen=True)
class CacheLayout:
    """The KV cache of a decoder graph: what it takes in memory at a given length (the fit check, the report)."""

    tensors: int  # past inputs: a key and a value per layer
    kv_heads: int
    head_dim: int
    itemsize: int

    def bytes_at(self, length: int, batch: int = 1) -> int:
        return self.tensors * batch * self.kv_heads * length * self.head_dim * self.itemsize


def cache_layout(folder) -> CacheLayout | None:
    """The KV cache of an export (read from its graph's past inputs, weights not loaded) or of a checkpoint (from
    its config.json, in FP32 as torch runs it); None where neither says."""
    import json

    p = Path(folder)
    if (p / ONNX_NAME).is_file() or p.suffix == ".onnx":
        import onnx

        graph = onnx.load(str(onnx_file(p)), load_external_data=False).graph
        past = [i for i in graph.input if i.name.startswith(PAST_PREFIX)]
        dims = [d.dim_value or None for d in past[0].type.tensor_type.shape.dim] if past else []
        if len(dims) != 4 or dims[1] is None or dims[3] is None:
            return None
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(past[0].type.tensor_type.elem_type).itemsize
        return CacheLayout(len(past), dims[1], dims[3], itemsize)
    if not (p / "config.json").is_file():
        return None
    c = json.loads((p / "config.json").read_text(encoding="utf-8"))
    c = {**c, **(c.get("text_config") or {})}  # Gemma 3 keeps the decoder's shape there
    layers, heads = c.get("num_hidden_layers") or c.get("n_layer"), c.get("num_attention_heads") or c.get("n_head")
    hidden = c.get("hidden_size") or c.get("n_embd")
    if not (layers and heads and hidden):
        return None
    return CacheLayout(2 * layers, c.get("num_key_value_heads") or heads, c.get("head_dim") or hidden // heads, 4)


def add_logits_to_keep(path: Path) -> bool:
    """Give the decoder graph at ``path`` the optional input ``logits_to_keep`` (int64 scalar, default 0 = every
    position): a Slice of the hidden states to their last ``logits_to_keep`` positions before the lm_head. A
    prefill that only picks the next token (generate, the benchmark) asks for 1 and skips the lm_head over the
    prompt: at SmolLM2-135M's shape that product is a fifth of the prefill's multiply-adds (49152x576 of ~135M
    weights per token), measured 59 of 294 ms of a 128-token INT4 prefill. A client that does not know the input
    (Optimum's ORTModelForCausalLM, onnxruntime-genai) gets every position, as before; verify scores every
    position. Written by hand because neither exporter has it: optimum-onnx's graphs always return every
    position, transformers' ``logits_to_keep`` is a forward argument the tracer turns into a constant.

    Returns False, leaving the file as it is, where the graph already has the input or its lm_head is not a
    MatMul of [batch, sequence, hidden] states. Only the graph is rewritten: external weights stay where they are."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.compress.int8 import graph_classifier_nodes

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return False
    head = graph_classifier_nodes(graph, "logits")
    index = next((k for k, n in enumerate(graph.node) if head and n.name == head[0]), None)
    if index is None or graph.node[index].op_type != "MatMul":
        return False
    node, p = graph.node[index], "/logits_to_keep/"
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), LOGITS_TO_KEEP),
                              numpy_helper.from_array(np.array([1], np.int64), p + "shape"),
                              numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), p + "ends"),
                              numpy_helper.from_array(np.array([1], np.int64), p + "axes")])
    # starts = -logits_to_keep: the last k positions; -0 = 0, every position (k past the length clamps to 0)
    new = [helper.make_node("Neg", [LOGITS_TO_KEEP], [p + "neg"], name=p + "Neg"),
           helper.make_node("Reshape", [p + "neg", p + "shape"], [p + "starts"], name=p + "Reshape"),
           helper.make_node("Slice", [node.input[0], p + "starts", p + "ends", p + "axes"], [p + "hidden"],
                            name=p + "Slice")]
    node.input[0] = p + "hidden"
    for k, n in enumerate(new):
        graph.node.insert(index + k, n)
    onnx.save_model(model, str(path))
    return True


def tensorrt_profile(inputs: dict, prompt: int, total: int) -> dict:
    """trt_profile_{min,opt,max}_shapes covering a prefill of up to ``prompt`` tokens on an empty cache and every
    decode step up to ``total`` tokens, for the graph's ``inputs`` (name -> dims; ints are fixed).

    onnxruntime's TensorRT provider wants every dynamic input in an explicit profile (onnxruntime PR #15546), and
    TensorRT checks min, opt and max each against the graph's shape constraints (the mask is as long as the
    cache plus the new tokens), so each is one consistent shape: min a one-token prefill, opt a decode step half
    way through the generation (the steps are most of the work and TensorRT tunes its kernels for opt), max the
    longest prompt on the longest cache. An empty cache is the min past length, as onnxruntime-genai's
    TensorRT profiles have it."""
    if not 1 <= prompt <= total:
        raise ValueError(f"a prompt of {prompt} tokens in a generation of {total}")
    mid = min(prompt + (total - prompt) // 2, total - 1)
    lengths = {"new": (1, 1, prompt), "past": (0, mid, total - 1), "mask": (1, mid + 1, prompt + total - 1)}
    def dim(name: str, kind: str | None, axis: int, d, k: int) -> int:
        if isinstance(d, int) and d > 0:
            return d
        if kind is not None and axis in (0, 2 if kind == "past" else 1):  # batch 1, or the length this input has
            return 1 if axis == 0 else lengths[kind][k]
        raise EdgekitError(f"the decoder graph's input '{name}' has a dimension ({d}) that edgekit cannot size for "
                           "TensorRT", "run it with --device cuda, or export it with edgekit export")

    out = {}
    for k, key in enumerate(("min", "opt", "max")):
        shapes = []
        for name, dims in inputs.items():
            if all(isinstance(d, int) and d > 0 for d in dims):
                continue  # a fixed shape (logits_to_keep: a scalar) needs no profile
            kind = "past" if name.startswith(PAST_PREFIX) else "mask" if name == "attention_mask" else (
                "new" if name in ("input_ids", "position_ids") else None)
            shapes.append(f"{name}:{'x'.join(str(dim(name, kind, i, d, k)) for i, d in enumerate(dims))}")
        out[f"trt_profile_{key}_shapes"] = ",".join(shapes)
    return out


# Past and present are bound to one buffer only where the graph file is small enough to read for its attention
# nodes: weights beside it, as the builder and edgekit's INT4 write them. A graph with its weights inside (edgekit's
# INT8 of a builder export) runs with separate past and present: reading it would parse every weight.
SHARED_CACHE_GRAPH_LIMIT = 64 * 2**20
SHARED_CACHE_HEADROOM = 256  # free positions a new shared buffer gets beyond the tokens it holds; doubled when full


def attention_shares_cache(f: Path, past_names: list[str], present_names: list[str]) -> bool:
    """Whether every past input of the graph at ``f`` is read, and every present output written, by onnxruntime's
    GroupQueryAttention: the kernel that, handed the same buffer as past and present, appends in place."""
    if f.stat().st_size > SHARED_CACHE_GRAPH_LIMIT:
        return False
    import onnx

    gqa = [n for n in onnx.load(str(f), load_external_data=False).graph.node
           if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    reads = {x for n in gqa for x in n.input[3:5]}  # past_key, past_value
    writes = {x for n in gqa for x in n.output[1:3]}  # present_key, present_value
    return bool(gqa) and set(past_names) <= reads and set(present_names) <= writes


@dataclass
class SharedCache:
    """A batch-1 KV cache held in one onnxruntime buffer per past input, [1, kv_heads, capacity, head_dim], bound
    as both the past input and the present output of each decode step. ``length``: positions filled."""

    values: dict  # past input name -> OrtValue
    length: int
    binding: object = None  # the session's IOBinding with these buffers bound, made by the first step

    @property
    def capacity(self) -> int:
        return next(iter(self.values.values())).shape()[2]

    def arrays(self) -> dict:
        """The filled part as plain arrays (a prefill or a batch step with this cache runs without sharing)."""
        return {n: v.numpy()[:, :, :self.length].copy() for n, v in self.values.items()}

    @classmethod
    def holding(cls, past: dict, capacity: int) -> "SharedCache":
        import onnxruntime as ort

        length = next(iter(past.values())).shape[2]
        values = {}
        for n, a in past.items():
            buf = np.zeros((1, a.shape[1], capacity, a.shape[3]), a.dtype)
            buf[:, :, :length] = a
            values[n] = ort.OrtValue.ortvalue_from_numpy(buf)
        return cls(values, length)


def gpu_decoder_session(f: Path, device: str, threads: int | None, lengths: tuple[int, int]):
    """An onnxruntime session on the CUDA or TensorRT provider, with the encoder path's providers, provider
    options, engine cache and session-creation errors.

    Not ``ort_runtime.load_onnxruntime`` itself: its TensorRT profile sizes [batch, sequence] inputs only and
    its node-placement run feeds a mask as long as the tokens beside a non-empty cache, which a decoder graph
    rejects; here the profile covers the cache and the placement run is a real prefill (OrtDecoder). The session
    itself is made by the same ``create_session``."""
    from edgekit.runtimes.ort_gpu import require_onnxruntime
    from edgekit.runtimes.ort_runtime import create_session

    require_onnxruntime()
    options = None
    if device == "tensorrt":
        from edgekit.runtimes.ort_gpu import tensorrt_provider_options
        from edgekit.runtimes.tensorrt import read_onnx_summary

        summary = read_onnx_summary(f)
        options = tensorrt_provider_options(fp16=getattr(device, "fp16", False), int8=summary.has_qdq,
                                            profile=tensorrt_profile({i.name: i.shape for i in summary.inputs},
                                                                     *lengths))
    return create_session(f, device, threads, options)


@dataclass
class OrtDecoder(DecoderSession):
    """An exported decoder-with-past on onnxruntime: the CPU, or the CUDA / TensorRT providers of ort_gpu.

    ``lengths`` (longest prompt, longest prompt + new tokens) sizes the TensorRT profile (default: the context).
    ``bind_memory`` runs through IOBinding with the cache kept in that memory: "cuda" on a GPU; "cpu" runs the
    same path on the CPU (the tests)."""

    path: Path
    threads: int | None = None
    device: str = "cpu"
    name: str = "onnxruntime"
    max_positions: int | None = None
    info: dict = field(default_factory=dict)
    lengths: tuple | None = None
    bind_memory: str | None = None
    phases: list = field(default_factory=list)  # per bound call: {h2d_ms, compute_ms, d2h_ms}
    share_cache: bool = True  # decode through a SharedCache where the graph allows it (CPU, unbound calls)

    def __post_init__(self):
        f = onnx_file(Path(self.path))
        if self.device == "cpu":
            from edgekit.runtimes.ort_runtime import load_onnxruntime

            # the one session factory (providers, threads, spinning off, load errors told apart)
            self.session = load_onnxruntime(f, self.device, self.threads, task="text-generation").info["session"]
            self._read_graph(f)
        else:
            from edgekit.runtimes.ort_gpu import check_active, node_placement, profile_discarded_on_error

            limit = self.max_positions or DEFAULT_GPU_CONTEXT
            self.session = gpu_decoder_session(f, self.device, self.threads, self.lengths or (limit, limit))
            self.name, self.bind_memory = f"onnxruntime-{self.device}", self.bind_memory or GPU_MEMORY
            # a refusal below drops a profiled session: its trace is discarded, not left in the temp folder
            with profile_discarded_on_error(self.session):
                self._read_graph(f)
                check_active(self.device, self.session.get_providers())
                # A real prefill (it also builds the TensorRT engine, before anything is timed); profiling stops
                # after it.
                n = min(4, (self.lengths or (4,))[0])
                self.info["placement"] = node_placement(self.session, self.feed(
                    np.full((1, n), 3, np.int64), np.ones((1, n), np.int64), self.empty_past(1)))

    def _read_graph(self, f: Path) -> None:
        """The cache layout and the graph's inputs and outputs; refuses a graph without a KV cache."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs or not any(n.startswith(PAST_PREFIX) for n in inputs):
            raise EdgekitError(f"{f} is not a decoder with a KV cache (no past_key_values inputs)",
                               "export the checkpoint with edgekit export (text-generation models get a cache)")
        # the graph's optional inputs (logits_to_keep) are initializers a caller may override: not in get_inputs()
        self.input_names = list(inputs) + [i.name for i in self.session.get_overridable_initializers()]
        self.past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_dtype = np.float16 if inputs[self.past_names[0]].type == "tensor(float16)" else np.float32
        shape = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
            raise EdgekitError(f"{f}: the cache inputs have no fixed head count and size ({shape})",
                               "export the checkpoint again with edgekit export")
        self.kv_heads, self.head_dim = shape[1], shape[3]
        self.layout = CacheLayout(len(self.past_names), self.kv_heads, self.head_dim, np.dtype(self.past_dtype).itemsize)
        self.vocab_size = self.session.get_outputs()[0].shape[-1]
        presents = [n for n in self.output_names if n.startswith(PRESENT_PREFIX)]
        self.share_cache = bool(self.share_cache and self.device == "cpu" and not self.bind_memory
                                and attention_shares_cache(f, self.past_names, presents))

    def empty_past(self, batch: int) -> dict:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.past_dtype) for n in self.past_names}

    def feed(self, ids: np.ndarray, mask: np.ndarray, past: dict, last_only: bool = False) -> dict:
        """Everything the graph takes, as arrays (the part a benchmark does not time)."""
        f = {"input_ids": np.ascontiguousarray(ids, np.int64), "attention_mask": np.ascontiguousarray(mask, np.int64)}
        if "position_ids" in self.input_names:
            f["position_ids"] = position_ids(mask, ids.shape[1])
        if last_only and LOGITS_TO_KEEP in self.input_names:
            f[LOGITS_TO_KEEP] = np.array(1, np.int64)
        f.update(past)
        return f

    def run_feed(self, feed: dict):
        """Only the runtime's call: (logits, the cache for the next step)."""
        outs = self.session.run(None, feed)
        return outs[0], self._past_of(outs)

    def _past_of(self, outs: list) -> dict:
        """The next call's cache: each ``present.N`` output under its ``past_key_values.N`` name."""
        return {PAST_PREFIX + n[len(PRESENT_PREFIX):]: v for n, v in zip(self.output_names, outs)
                if n.startswith(PRESENT_PREFIX)}

    def run_bound(self, feed: dict):
        """The call through IOBinding: numpy inputs are copied to ``bind_memory``, OrtValues (the cache a
        previous call left there) are bound where they are, every output stays there but the logits, which
        come back to the host. Each phase is a synchronous call timed on the host."""
        import onnxruntime as ort

        mem = self.bind_memory
        t0 = time.perf_counter_ns()
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, mem, 0)
                                        if isinstance(value, np.ndarray) else value)
        for name in self.output_names:
            binding.bind_output(name, mem, 0)
        t1 = time.perf_counter_ns()
        self.session.run_with_iobinding(binding)
        t2 = time.perf_counter_ns()
        outs = binding.get_outputs()
        logits = outs[0].numpy()  # OrtValue.numpy copies a device tensor to the host
        t3 = time.perf_counter_ns()
        self.phases.append({"h2d_ms": (t1 - t0) / 1e6, "compute_ms": (t2 - t1) / 1e6, "d2h_ms": (t3 - t2) / 1e6})
        return logits, self._past_of(outs)

    def forward(self, ids, mask, past, last_only=False):
        if self.share_cache and ids.shape == (1, 1) and (
                isinstance(past, SharedCache) or (past and next(iter(past.values())).shape[2] > 0)):
            return self.step_shared(ids, mask, past)
        if isinstance(past, SharedCache):
            past = past.arrays()
        feed = self.feed(ids, mask, past if past is not None else self.empty_past(len(ids)), last_only)
        return self.run_bound(feed) if self.bind_memory else self.run_feed(feed)

    def step_shared(self, ids: np.ndarray, mask: np.ndarray, past):
        """One decode step that appends to a SharedCache in place (made from ``past`` when it is the arrays a
        prefill returned, grown by doubling when full): (logits, the same cache)."""
        total = mask.shape[1]
        if not isinstance(past, SharedCache) or total > past.capacity:
            arrays = past.arrays() if isinstance(past, SharedCache) else past
            capacity = total + SHARED_CACHE_HEADROOM
            if isinstance(past, SharedCache):
                capacity = max(capacity, 2 * past.capacity)
            if self.max_positions and total <= self.max_positions:
                capacity = min(capacity, self.max_positions)  # never longer than the model's context
            past = SharedCache.holding(arrays, capacity)
        if past.binding is None:
            past.binding = self.session.io_binding()
            past.binding.bind_output(self.output_names[0])  # the logits: output 0 of the binding
            for name, value in past.values.items():
                past.binding.bind_ortvalue_input(name, value)
                past.binding.bind_ortvalue_output(PRESENT_PREFIX + name[len(PAST_PREFIX):], value)
        b = past.binding
        for name, value in self.feed(ids, mask, {}).items():
            b.bind_cpu_input(name, value)
        b.bind_output(self.output_names[0])  # a fresh logits tensor each step: the caller may keep the last one
        self.session.run_with_iobinding(b)
        past.length = total
        return b.get_outputs()[0].numpy(), past

    def take_phases(self) -> list:
        """The phases of the bound calls since the last take (a generation: its prefill, then each step)."""
        out, self.phases = self.phases, []
        return out

    def device_info(self) -> dict:
        """The session's own figures for the bench report (benchmarks/gpu.session_device_report)."""
        return {"timing": "host timers around synchronous onnxruntime calls (IOBinding); the KV cache stays in "
                          "device memory between steps, only the logits are copied back",
                "providers": self.session.get_providers(), **self.info.get("placement", {})}

    def kv_bytes(self, length: int, batch: int = 1) -> int:
        """Bytes of the cache at ``length`` tokens."""
        return self.layout.bytes_at(length, batch)


@dataclass
class TorchDecoder(DecoderSession):
    """The original checkpoint on PyTorch (FP32), with transformers' own cache."""

    model: object
    name: str = "torch-fp32"
    max_positions: int | None = None

    def __post_init__(self):
        import inspect

        self.vocab_size = self.model.config.vocab_size
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def forward(self, ids, mask, past, last_only=False):
        import torch

        # transformers' own logits_to_keep where the model's forward takes it (Llama, Qwen, ... ; not GPT-2)
        keep = {"logits_to_keep": 1} if last_only and self._keeps_logits else {}
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                             attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
                             position_ids=torch.from_numpy(position_ids(np.asarray(mask), ids.shape[1])),
                             past_key_values=past, use_cache=True, **keep)
        return out.logits.float().numpy(), out.past_key_values


def torch_only(path, device: str) -> EdgekitError:
    return EdgekitError(f"{path} is a checkpoint, which edgekit runs on torch on the CPU only",
                        f"export it (edgekit export) and run the export on '{device}'")


def load_decoder(artifact, threads: int | None = None, device: str = "cpu", lengths: tuple | None = None
                 ) -> DecoderSession:
    """A decoder session for an exported folder (ONNX) or an opened text-generation checkpoint (torch).

    ``lengths``: (longest prompt, longest prompt + new tokens) of the run, for a TensorRT profile."""
    from edgekit.checkpoint import Checkpoint, load_model
    from edgekit.tasks import is_decoder, max_positions

    if isinstance(artifact, Checkpoint):
        if not is_decoder(artifact.task):
            raise EdgekitError(f"{artifact.path} is a {artifact.task.name} model, so it does not generate text",
                               "give a text-generation checkpoint (*ForCausalLM) or its export")
        if device != "cpu":
            raise torch_only(artifact.path, device)
        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchDecoder(load_model(artifact), max_positions=max_positions(artifact.config))
    folder = Path(artifact)
    cfg = folder / "config.json"
    limit = None
    if cfg.is_file():
        import json

        limit = max_positions(json.loads(cfg.read_text(encoding="utf-8")))
    if not (folder / ONNX_NAME).is_file() and not folder.suffix == ".onnx":
        raise EdgekitError(f"{folder} holds no {ONNX_NAME}", "point at a folder written by edgekit export or quantize")
    return OrtDecoder(folder, threads, device, max_positions=limit, lengths=lengths)


def open_decoder(path, threads: int | None = None, device: str = "cpu", trust_remote_code: bool = False,
                 lengths: tuple | None = None):
    """(session, what was opened: a Checkpoint or the export's folder) for a folder the user named: a checkpoint
    or adapter (opened with the checkpoint rules, run on torch) or an export (onnxruntime)."""
    from edgekit.adapters import is_adapter
    from edgekit.checkpoint import open_checkpoint
    from edgekit.runtimes.base import artifact_kind

    p = Path(path)
    if not p.is_dir():
        raise EdgekitError(f"{p} is not a folder", "give a decoder checkpoint folder or its edgekit export")
    if is_adapter(p) or artifact_kind(p) == "checkpoint":
        ckpt = open_checkpoint(p, None, trust_remote_code)
        return load_decoder(ckpt, threads=threads, device=device), ckpt
    return load_decoder(p, threads=threads, device=device, lengths=lengths), p


def check_length(session: DecoderSession, n: int, what: str) -> None:
    if session.max_positions and n > session.max_positions:
        raise EdgekitError(f"{what} is {n} tokens, longer than the model's context of {session.max_positions}",
                           "shorten it, or lower --new-tokens / --max-length")


def greedy(session: DecoderSession, prompt: list[int], new_tokens: int, eos: int | None = None,
           on_token=None) -> dict:
    """Greedy continuation of one prompt with the cache: {"tokens", "ttft_s", "step_s": per decode step}."""
    check_length(session, len(prompt) + new_tokens, "the prompt plus --new-tokens")
    ids = np.asarray([prompt], np.int64)
    mask = np.ones_like(ids)
    t0 = time.perf_counter()
    logits, past = session.forward(ids, mask, session.empty_past(1), last_only=True)
    out, steps = [int(np.argmax(logits[0, -1]))], []
    ttft = time.perf_counter() - t0
    if on_token:
        on_token(out[-1])
    while len(out) < new_tokens and (eos is None or out[-1] != eos):
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        t = time.perf_counter()
        logits, past = session.forward(np.asarray([[out[-1]]], np.int64), mask, past)
        steps.append(time.perf_counter() - t)
        out.append(int(np.argmax(logits[0, -1])))
        if on_token:
            on_token(out[-1])
    return {"tokens": out, "ttft_s": ttft, "step_s": steps}


def window_logits(session: DecoderSession, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of one window in one prefill (no cache carried in)."""
    a = np.asarray([ids], np.int64)
    return session.forward(a, np.ones_like(a), session.empty_past(1))[0][0]
