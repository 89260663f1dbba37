"""TensorRT engine planning and the engine/machine check: pure functions, no TensorRT or GPU needed.

The build itself (TensorRT + a GPU) is in test_gpu_runtimes.py, marked gpu and skipped without one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import assert_user_error, run_cli
from tiny_onnx import tiny_classifier

from edgekit.errors import EdgekitError, MissingExtra
from edgekit.runtimes.tensorrt_plan import (EngineOptions, OnnxInput, check_sidecar, engine_build_command,
                                            parse_range, parse_shapes, plan_build)

BERT_INPUTS = [OnnxInput("input_ids", ("batch", "sequence")), OnnxInput("attention_mask", ("batch", "sequence"))]
ROOT = Path(__file__).resolve().parents[1]


def test_default_profile_covers_verify_batches_and_caps_sequence_at_the_model():
    plan = plan_build(BERT_INPUTS, EngineOptions(max_positions=64), "10.3.0")
    lo, opt, hi = plan.profiles["input_ids"]
    assert lo == [1, 1] and opt == [1, 64] and hi == [32, 64]  # opt 128 capped at the model's 64 positions
    assert plan.profiles["attention_mask"] == plan.profiles["input_ids"]
    assert not plan.strongly_typed and not plan.fp16_flag and plan.major == 10
    big = plan_build(BERT_INPUTS, None, "10.3")
    assert big.profiles["input_ids"] == [[1, 1], [1, 128], [32, 512]]


def test_batch_and_seq_ranges_and_static_dimensions():
    inputs = [OnnxInput("input_ids", (1, "sequence")), OnnxInput("token_type_ids", (1, 16))]
    plan = plan_build(inputs, EngineOptions(batch=(1, 4, 8), seq=(8, 64, 256)), "10.3")
    assert plan.profiles == {"input_ids": [[1, 8], [1, 64], [1, 256]]}  # static dims kept, static input skipped
    assert parse_range("1,8,32", "batch") == (1, 8, 32) and parse_range("16", "seq") == (16, 16, 16)


def test_explicit_shapes():
    opts = EngineOptions(min_shapes=parse_shapes("input_ids:1x1,attention_mask:1x1", "min-shapes"),
                         opt_shapes=parse_shapes("input_ids:4x128,attention_mask:4x128", "opt-shapes"),
                         max_shapes=parse_shapes("input_ids:8x256,attention_mask:8x256", "max-shapes"))
    plan = plan_build(BERT_INPUTS, opts, "11.4.0.106")
    assert plan.profiles["input_ids"] == [[1, 1], [4, 128], [8, 256]]


@pytest.mark.parametrize("opts, fragment", [
    (EngineOptions(batch=(8, 4, 32)), "1 <= MIN <= OPT <= MAX"),
    (EngineOptions(seq=(1, 128, 1024), max_positions=512), "beyond the model's 512 positions"),
    (EngineOptions(min_shapes={"input_ids": (1, 1)}), "go together"),
    (EngineOptions(min_shapes={"input_ids": (1, 1)}, opt_shapes={"input_ids": (1, 8)},
                   max_shapes={"input_ids": (1, 16)}), "no --min-shapes entry"),
    (EngineOptions(min_shapes={"input_ids": (1,), "attention_mask": (1, 1)}, opt_shapes={"input_ids": (1, 8), "attention_mask": (1, 8)},
                   max_shapes={"input_ids": (1, 16), "attention_mask": (1, 16)}), "has 1 dimensions"),
    (EngineOptions(min_shapes={"input_ids": (1, 9), "attention_mask": (1, 9)}, opt_shapes={"input_ids": (1, 8), "attention_mask": (1, 8)},
                   max_shapes={"input_ids": (1, 16), "attention_mask": (1, 16)}), "MIN <= OPT <= MAX"),
    (EngineOptions(min_shapes={"pixels": (1, 1)}, opt_shapes={"pixels": (1, 1)}, max_shapes={"pixels": (1, 1)}),
     "which the model does not take"),
    (EngineOptions(batch=(1, 1, 4), min_shapes={}, opt_shapes={}, max_shapes={}), "pass only one of them"),
    (EngineOptions(workspace_mb=0), "--workspace-mb"),
])
def test_bad_shapes_are_user_errors(opts, fragment):
    with pytest.raises(EdgekitError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        plan_build(BERT_INPUTS, opts, "10.3")


def test_bad_option_text_and_unknown_layouts():
    for bad in ("1,2", "a,b,c", "1,2,3,4"):
        with pytest.raises(EdgekitError, match="MIN,OPT,MAX"):
            parse_range(bad, "batch")
    for bad in ("input_ids", "input_ids:1xA", ":1x2", ""):
        with pytest.raises(EdgekitError, match="input_ids:1x128"):
            parse_shapes(bad, "min-shapes")
    with pytest.raises(EdgekitError, match="not \\[batch, sequence\\]"):
        plan_build([OnnxInput("pixels", ("batch", 3, "h", "w"))], None, "10.3")
    with pytest.raises(EdgekitError, match="older than 10"):
        plan_build(BERT_INPUTS, None, "8.6.2")


def test_qdq_is_strongly_typed_and_tensorrt_11_always_is():
    assert plan_build(BERT_INPUTS, None, "10.3", has_qdq=True).strongly_typed
    assert not plan_build(BERT_INPUTS, None, "10.3", has_qdq=False).strongly_typed
    plan = plan_build(BERT_INPUTS, None, "11.4", has_qdq=False)
    assert plan.strongly_typed and not plan.fp16_flag
    with pytest.raises(EdgekitError, match="symmetric"):
        plan_build(BERT_INPUTS, None, "10.3", has_qdq=True, asymmetric_qdq=2)


def test_fp16_on_10_is_a_flag_and_on_11_needs_fp16_types():
    assert plan_build(BERT_INPUTS, EngineOptions(fp16=True), "10.3").fp16_flag
    with pytest.raises(EdgekitError, match="Q/DQ"):
        plan_build(BERT_INPUTS, EngineOptions(fp16=True), "10.3", has_qdq=True)
    with pytest.raises(EdgekitError, match="no FP16 builder flag.*modelopt.onnx.autocast"):
        plan_build(BERT_INPUTS, EngineOptions(fp16=True), "11.0")
    plan = plan_build(BERT_INPUTS, EngineOptions(fp16=True), "11.0", has_fp16=True)
    assert not plan.fp16_flag and plan.strongly_typed


def test_read_onnx_summary(tmp_path):
    from edgekit.runtimes.tensorrt import read_onnx_summary

    plain = read_onnx_summary(tiny_classifier(tmp_path / "p") / "model.onnx")
    assert [i.name for i in plain.inputs] == ["input_ids", "attention_mask"]
    assert plain.inputs[0].shape == ("batch", "sequence") and not plain.has_qdq and not plain.has_fp16
    q = read_onnx_summary(tiny_classifier(tmp_path / "q", qdq=True) / "model.onnx")
    assert q.has_qdq and q.asymmetric_qdq == 0
    assert read_onnx_summary(tiny_classifier(tmp_path / "a", qdq=True, zero_point=3) / "model.onnx").asymmetric_qdq == 2
    assert read_onnx_summary(tiny_classifier(tmp_path / "h", fp16=True) / "model.onnx").has_fp16


BUILT = {"tensorrt": "10.3.0.30", "compute_capability": "8.7", "gpu_name": "Orin (nvgpu)", "jetpack": "6.2"}


def _sidecar(**built):
    return {"built_with": {**BUILT, **built}, "source_onnx": "/data/minilm-int8",
            "options": {"fp16": True, "batch": [1, 8, 32], "seq": None}}


def test_sidecar_matches_the_machine():
    assert check_sidecar(_sidecar(), {**BUILT, "tensorrt": "10.3.0"}) == []  # the build number does not matter
    warnings = check_sidecar(_sidecar(), {**BUILT, "gpu_name": "Orin NX"})
    assert len(warnings) == 1 and "not tuned for this GPU" in warnings[0]


@pytest.mark.parametrize("machine, fragment", [
    ({**BUILT, "tensorrt": "10.7.0"}, "TensorRT 10.3.0.30 (this machine has 10.7.0)"),
    ({**BUILT, "compute_capability": "8.9", "gpu_name": "L4"}, "compute capability 8.7"),
])
def test_sidecar_mismatch_says_rebuild_on_the_target(machine, fragment):
    with pytest.raises(EdgekitError) as err:
        check_sidecar(_sidecar(), machine, "engines/model.engine", "engines")
    text = str(err.value)
    assert fragment in text and "rebuild it on this machine" in text
    assert "edgekit engine build /data/minilm-int8 -o engines --overwrite --fp16 --batch 1,8,32" in text


def test_engine_without_sidecar_is_refused():
    with pytest.raises(EdgekitError, match="no model.engine.json"):
        check_sidecar(None, BUILT)
    assert engine_build_command({}).startswith("edgekit engine build MODEL_ONNX_DIR -o ENGINE_DIR")


def test_api_shapes_of_tensorrt_10_and_11():
    from edgekit.runtimes.tensorrt import trt_api

    class Engine10:
        device_memory_size = 1
        device_memory_size_v2 = 2

    class Engine11:
        device_memory_size_v2 = 2

    t10 = SimpleNamespace(__version__="10.3.0", NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
                          BuilderFlag=SimpleNamespace(FP16="fp16"), ICudaEngine=Engine10)
    t11 = SimpleNamespace(__version__="11.4.0.106", NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0),
                          BuilderFlag=SimpleNamespace(), ICudaEngine=Engine11)
    a10, a11 = trt_api(t10), trt_api(t11)
    qdq10 = plan_build(BERT_INPUTS, None, "10.3", has_qdq=True)
    assert a10.network_flags(qdq10) == 1 << 1 and a10.network_flags(plan_build(BERT_INPUTS, None, "10.3")) == 0
    assert a11.network_flags(plan_build(BERT_INPUTS, None, "11.4")) == 0  # always strongly typed, flag ignored
    assert a10.fp16_flag == "fp16" and a11.fp16_flag is None
    assert a10.device_memory_attr == "device_memory_size_v2" == a11.device_memory_attr
    assert a11.activation_bytes(SimpleNamespace(device_memory_size_v2=123)) == 123


def test_every_listed_tensorrt_name_is_used_by_the_code():
    from edgekit.runtimes.tensorrt import TENSORRT_API, TENSORRT_API_OPTIONAL

    source = "".join((ROOT / "edgekit/runtimes" / f).read_text() for f in ("tensorrt.py", "tensorrt_session.py"))
    for name in TENSORRT_API + TENSORRT_API_OPTIONAL:
        assert name.split(".")[-1] in source.replace("TENSORRT_API", ""), name


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed (the 'tensorrt' extra)")
def test_installed_tensorrt_has_every_attribute_we_use():
    import tensorrt as trt

    from edgekit.runtimes.tensorrt import TENSORRT_API, TENSORRT_API_OPTIONAL, trt_api

    def has(dotted):
        obj = trt
        for part in dotted.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True

    missing = [n for n in TENSORRT_API if not has(n)]
    assert not missing, f"TensorRT {trt.__version__} lacks {missing}"
    api = trt_api(trt)
    assert api.device_memory_attr is not None
    assert (api.fp16_flag is None) == (api.major >= 11)
    assert any(has(n) for n in TENSORRT_API_OPTIONAL)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_bindings") is None,
                    reason="tensorrt-cu12-bindings is not installed (.ci/run installs 10.3.0, JetPack 6's TensorRT)")
def test_tensorrt_bindings_define_every_name_we_use():
    """Without a GPU the full TensorRT wheel cannot be installed here (its libs come from NVIDIA's own index),
    but the bindings wheel can: its pybind11 module registers every class, method and enum value by a C string,
    so each name the code uses must appear in the module's binary (or its Python __init__)."""
    import importlib.metadata

    from edgekit.runtimes.tensorrt import TENSORRT_API, TENSORRT_API_OPTIONAL

    folder = Path(importlib.util.find_spec("tensorrt_bindings").origin).parent
    binary = b"".join(p.read_bytes() for p in folder.iterdir() if p.suffix == ".so")
    python = "".join(p.read_text(errors="replace") for p in folder.iterdir() if p.suffix == ".py")
    version = importlib.metadata.version("tensorrt-cu12-bindings")

    def present(name):  # a C string ending the name (the linker merges "INPUT" into "CONDITIONAL_INPUT"), or
        return all(part.encode() + b"\0" in binary or part in python for part in name.split("."))  # __init__.py

    missing = [n for n in TENSORRT_API if not present(n)]
    assert not missing, f"TensorRT {version} bindings lack {missing}"
    optional = {n: present(n) for n in TENSORRT_API_OPTIONAL}
    if version.startswith("10."):
        assert optional["NetworkDefinitionCreationFlag.STRONGLY_TYPED"] and optional["BuilderFlag.FP16"]
    assert not present("ICudaEngine.no_such_method_in_any_release")  # the check can fail


def test_engine_folders_are_their_own_artifact_kind(tmp_path):
    from edgekit.runtimes.base import artifact_kind, load

    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / "model.engine").write_bytes(b"not really")
    assert artifact_kind(folder) == "engine" and artifact_kind(folder / "model.engine") == "engine"
    with pytest.raises(EdgekitError, match="runs on the GPU, not on 'cpu'.*--device cuda"):
        load(folder)
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(MissingExtra, match=r"edgekit-transformers\[tensorrt\]"):
            load(folder, device="cuda")
    onnx = tiny_classifier(tmp_path / "onnx")
    with pytest.raises(EdgekitError, match="holds no TensorRT engine.*edgekit engine build"):
        load(onnx, device="cuda", runtime="tensorrt")


def test_engine_plan_and_build_commands(tmp_path):
    onnx = tiny_classifier(tmp_path / "tiny", qdq=True)
    r = run_cli("engine", "plan", onnx, "--tensorrt-version", "10.3", "--batch", "1,4,8", "--json")
    plan = json.loads(r.stdout)
    assert plan["strongly_typed"] and plan["profiles"]["input_ids"] == [[1, 1], [4, 128], [8, 512]]
    assert_user_error(run_cli("engine", "plan", onnx, "--tensorrt-version", "10.3", "--fp16", expect=None), "Q/DQ")
    assert_user_error(run_cli("engine", "plan", onnx, "--tensorrt-version", "10.3", "--seq", "1,x", expect=None),
                      "MIN,OPT,MAX")
    if importlib.util.find_spec("tensorrt") is None:
        assert_user_error(run_cli("engine", "build", onnx, "-o", tmp_path / "e", expect=None), "edgekit-transformers[tensorrt]")
        assert not (tmp_path / "e").exists()


def test_engine_plan_without_tensorrt_uses_a_device_profile(tmp_path, monkeypatch):
    import edgekit.runtimes.tensorrt as rt

    def not_installed():
        raise MissingExtra("tensorrt", "tensorrt")

    if importlib.util.find_spec("tensorrt") is not None:  # same refusal as this machine's, wherever it runs
        monkeypatch.setattr(rt, "import_tensorrt", not_installed)
    onnx = tiny_classifier(tmp_path / "tiny", qdq=True)
    r = run_cli("engine", "plan", onnx)
    assert r.output.startswith("TensorRT 10.x: strongly typed")  # cuda-gpu records TensorRT 10.x
    assert "TensorRT version: from the device profile cuda-gpu" in r.output and "not installed here" in r.output
    plan = json.loads(run_cli("engine", "plan", onnx, "--device", "jetson-orin-nano-8gb", "--json").stdout)
    assert plan["tensorrt"] == "10.3" and "jetson-orin-nano-8gb" in plan["tensorrt_source"]
    assert_user_error(run_cli("engine", "plan", onnx, "--device", "x86-cpu", expect=None), "records no TensorRT")
    assert_user_error(run_cli("engine", "plan", onnx, "--device", "jetson-orin-nano-8gb", "--tensorrt-version",
                              "10.3", expect=None), "pass only one")
    assert json.loads(run_cli("engine", "plan", onnx, "--tensorrt-version", "11.0", "--json").stdout)[
        "tensorrt_source"] == "given with --tensorrt-version"


class _FakeTrt:
    """Just the TensorRT surface build_engine and load_tensorrt use (10.x shape), recording the calls it receives.

    Two refusals are modelled on the real ones:
    - ``OnnxParser.parse_from_file`` returns False and records one error per node whose op TensorRT's ONNX
      parser cannot import: the ops marked N in onnx-tensorrt's operator support matrix (docs/operators.md:
      MatMulInteger, DynamicQuantizeLinear, ConvInteger, QLinearMatMul, QLinearConv) and com.microsoft contrib
      ops, which have no importer; the message is the shape of the parser's "In node ... operator: X
      (checkFallbackPluginImporter): INVALID_NODE" error;
    - ``ICudaEngine.create_execution_context`` returns None with ``context=False``: TensorRT's Python API docs
      (ICudaEngine.create_execution_context, bound in pyCore.cpp to createExecutionContext) return None when
      the context cannot be created, e.g. when its activation memory cannot be allocated.
    """

    UNPARSABLE = {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "QLinearMatMul", "QLinearConv"}

    def __init__(self, version="10.3.0", fp16=True, context=True):
        calls = self.calls = []
        self.__version__ = version
        unparsable = self.UNPARSABLE

        class Logger:
            WARNING = "warning"

            def __init__(self, severity):
                pass

        class Network:
            num_inputs = 2

            def get_input(self, i):
                return SimpleNamespace(name=("input_ids", "attention_mask")[i])

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                calls.append(("set_shape", name, lo, opt, hi))

        class Cache:
            def serialize(self):
                return b"CACHE"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                calls.append(("workspace", size))

            def set_flag(self, flag):
                calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                calls.append(("profile",))

            def create_timing_cache(self, data):
                calls.append(("timing_cache_in", bytes(data)))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return Cache()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"ENGINE"

        class OnnxParser:
            def __init__(self, network, logger):
                self.errors = []

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

            def parse_from_file(self, path):
                import onnx

                calls.append(("parse", Path(path).name))
                graph = onnx.load(str(path), load_external_data=False).graph
                self.errors = [f"In node {i} with name: {n.name} and operator: {n.op_type} "
                               "(checkFallbackPluginImporter): INVALID_NODE: creator && \"Plugin not found\""
                               for i, n in enumerate(graph.node)
                               if n.op_type in unparsable or n.domain not in ("", "ai.onnx")]
                return not self.errors

        class Engine:
            device_memory_size_v2 = 4096
            num_io_tensors = 3

            def get_tensor_name(self, i):
                return ("input_ids", "attention_mask", "logits")[i]

            def get_tensor_mode(self, name):
                return "INPUT" if name != "logits" else "OUTPUT"

            def create_execution_context(self):
                calls.append(("create_execution_context",))
                return SimpleNamespace() if context else None

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return Engine() if bytes(data) == b"ENGINE" else None

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime
        self.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)
        self.BuilderFlag = SimpleNamespace(FP16="FP16") if fp16 else SimpleNamespace()
        self.ICudaEngine = Engine


FACTS = {"tensorrt": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "jetpack": "6.2", "l4t": "36.4.3",
         "cuda_runtime": "12.6", "cuda_driver": "12.6", "integrated": True, "gpu_memory_bytes": 8 << 30}


def test_build_engine_drives_tensorrt_as_planned(tmp_path, monkeypatch):
    import edgekit.runtimes.tensorrt as rt

    fake = _FakeTrt()
    monkeypatch.setattr(rt, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(rt, "machine_facts", lambda trt=None: dict(FACTS))
    onnx = tiny_classifier(tmp_path / "int8", qdq=True)
    (onnx / "vocab.txt").write_text("[PAD]\n")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"OLD")
    path = rt.build_engine(onnx, tmp_path / "engine", EngineOptions(batch=(1, 2, 8), seq=(1, 16, 64), workspace_mb=256,
                                                                   timing_cache=str(cache)))
    assert path.read_bytes() == b"ENGINE" and cache.read_bytes() == b"CACHE"
    assert ("create_network", 1 << 0) in fake.calls  # Q/DQ on TensorRT 10: strongly typed
    assert ("set_shape", "input_ids", (1, 1), (2, 16), (8, 64)) in fake.calls and ("workspace", 256 << 20) in fake.calls
    assert ("timing_cache_in", b"OLD") in fake.calls and not any(c[0] == "flag" for c in fake.calls)
    folder = path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["edgekit.json", "model.engine", "model.engine.json", "vocab.txt"]
    sidecar = json.loads((folder / "model.engine.json").read_text())
    assert sidecar["built_with"] == FACTS and sidecar["plan"]["strongly_typed"] and sidecar["task"] == "text-classification"
    assert json.loads((folder / "edgekit.json").read_text())["stage"] == "engine"
    with pytest.raises(EdgekitError, match="not empty"):  # refused before another long build
        rt.build_engine(onnx, folder, EngineOptions())
    monkeypatch.setattr(rt, "machine_facts", lambda trt=None: {**FACTS, "tensorrt": "10.7.0"})
    with pytest.raises(EdgekitError, match=f"rebuild it on this machine with: edgekit engine build {onnx.resolve()}"):
        rt.load_tensorrt(folder, device="cuda")


def test_fp16_build_sets_the_flag_only_where_it_exists(tmp_path, monkeypatch):
    import edgekit.runtimes.tensorrt as rt

    fake = _FakeTrt()
    monkeypatch.setattr(rt, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(rt, "machine_facts", lambda trt=None: dict(FACTS))
    onnx = tiny_classifier(tmp_path / "fp32")
    rt.build_engine(onnx, tmp_path / "e16", EngineOptions(fp16=True, use_timing_cache=False))
    assert ("flag", "FP16") in fake.calls and ("create_network", 0) in fake.calls
    fake11 = _FakeTrt("11.4.0.106", fp16=False)
    monkeypatch.setattr(rt, "import_tensorrt", lambda: fake11)
    with pytest.raises(EdgekitError, match="no FP16 builder flag"):
        rt.build_engine(onnx, tmp_path / "e11", EngineOptions(fp16=True))
    assert not (tmp_path / "e11").exists()


def test_fp16_onnx_on_tensorrt_10_is_strongly_typed(tmp_path, monkeypatch):
    import edgekit.runtimes.tensorrt as rt

    for opts in (None, EngineOptions(fp16=True)):  # FP16 comes from the ONNX's types, asked for or not
        plan = plan_build(BERT_INPUTS, opts, "10.3", has_fp16=True)
        assert plan.strongly_typed and not plan.fp16_flag
        assert any("FP16 tensors found: strongly typed" in n and "10.12" in n for n in plan.notes)
    assert plan_build(BERT_INPUTS, None, "10.3", has_fp16=True, has_qdq=True).strongly_typed
    fake = _FakeTrt()
    monkeypatch.setattr(rt, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(rt, "machine_facts", lambda trt=None: dict(FACTS))
    onnx = tiny_classifier(tmp_path / "fp16", fp16=True)
    path = rt.build_engine(onnx, tmp_path / "e", EngineOptions(fp16=True, use_timing_cache=False))
    assert ("create_network", 1 << 0) in fake.calls and not any(c[0] == "flag" for c in fake.calls)
    plan = json.loads((path.parent / "model.engine.json").read_text())["plan"]
    assert plan["strongly_typed"] and any("FP16 tensors found" in n for n in plan["notes"])


def test_execution_context_none_is_a_user_error(tmp_path, monkeypatch):
    import edgekit.runtimes.tensorrt as rt

    monkeypatch.setattr(rt, "import_tensorrt", lambda: _FakeTrt())
    monkeypatch.setattr(rt, "machine_facts", lambda trt=None: dict(FACTS))
    folder = rt.build_engine(tiny_classifier(tmp_path / "fp32"), tmp_path / "e",
                             EngineOptions(use_timing_cache=False)).parent
    session = rt.load_tensorrt(folder, device="cuda")
    assert session.input_names == ["input_ids", "attention_mask"] and session.info["activation_bytes"] == 4096
    no_memory = _FakeTrt(context=False)
    monkeypatch.setattr(rt, "import_tensorrt", lambda: no_memory)
    with pytest.raises(EdgekitError, match="could not create an execution context.*smaller --batch/--seq"
                                           ".*--workspace-mb"):
        rt.load_tensorrt(folder, device="cuda")
    assert ("create_execution_context",) in no_memory.calls


def test_dynamic_int8_onnx_is_refused_before_tensorrt_parses(tmp_path, monkeypatch):
    from onnxruntime.quantization import quantize_dynamic

    import edgekit.runtimes.tensorrt as rt

    onnx = tiny_classifier(tmp_path / "dyn")  # what edgekit quantize's default (dynamic) mode makes of it
    quantize_dynamic(str(onnx / "model.onnx"), str(onnx / "model.int8.onnx"))
    (onnx / "model.int8.onnx").replace(onnx / "model.onnx")
    ops = rt.read_onnx_summary(onnx / "model.onnx").op_types
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    fake = _FakeTrt()
    logger = fake.Logger(fake.Logger.WARNING)
    with pytest.raises(EdgekitError, match="could not parse.*operator: MatMulInteger"):  # what the parser says
        rt._parse(fake, fake.Builder(logger).create_network(0), logger, onnx / "model.onnx")
    line = assert_user_error(run_cli("engine", "plan", onnx, "--tensorrt-version", "10.3", expect=None),
                             "DynamicQuantizeLinear, MatMulInteger", "TensorRT's ONNX parser cannot read",
                             "edgekit quantize --mode static --symmetric-activations")
    build = run_cli("engine", "build", onnx, "-o", tmp_path / "e", expect=None)  # said even without TensorRT
    assert assert_user_error(build) == line and not (tmp_path / "e").exists()
    fake = _FakeTrt()
    monkeypatch.setattr(rt, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(rt, "machine_facts", lambda trt=None: dict(FACTS))
    with pytest.raises(EdgekitError, match="--mode static --symmetric-activations"):  # bench --runtime tensorrt
        rt.ensure_engines([onnx], EngineOptions(), tmp_path / "bench", None)
    assert not any(c[0] == "parse" for c in fake.calls)
