"""The Triton Python-backend model: a compiled engine whose weights are hot-swapped from a folder.

``model_repository/<name>/1/model.py`` only re-exports :class:`TritonPythonModel`. Each instance
of ``instance_group`` is its own process with its own engine, watcher and metrics series.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.errors import HotswapError, for_model
from serving.factory import add_search_paths
from serving.metrics import HotswapMetrics
from serving.service import HotswapService
from serving.settings import parse_settings
from serving.triton.batching import split_batches
from serving.triton.metrics import TritonMetricsBackend
from serving.triton.model_config import ModelIO, parse_model_io
from serving.triton.version_output import VERSION_OUTPUT, VERSION_UTF8_OUTPUT, encode_utf8, string_output_problem

log = logging.getLogger("hotswap.triton")


def _pb() -> Any:
    import triton_python_backend_utils as pb_utils  # only available inside Triton's Python backend

    return pb_utils


def use_utf8_text_io() -> None:
    """Triton's embedded Python may start in the C locale (ASCII): torch's compiler reads its
    templates as locale-encoded text and fails on UTF-8. Switch LC_CTYPE, which sets the default
    text encoding of ``open()``."""
    import locale

    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            return
        except locale.Error:
            continue
    log.warning("no UTF-8 locale available; compiling engines may fail on non-ASCII text")


def response_parameters_supported(pb: Any) -> bool:
    """Whether this Python backend's InferenceResponse takes ``parameters=`` (it came after Triton 2.51,
    whose stub raises TypeError)."""
    try:
        pb.InferenceResponse(output_tensors=[], parameters={"hotswap_weights_version": ""})
    except TypeError:
        return False
    return True


class TritonPythonModel:
    """Triton calls ``initialize``, then ``execute`` per batch of requests, then ``finalize``."""

    service: HotswapService
    io: ModelIO

    def initialize(self, args: dict[str, str]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        use_utf8_text_io()
        pb = _pb()
        model_name = args["model_name"]
        try:
            with for_model(model_name):
                self._start(pb, args)
        except HotswapError as e:
            # Raising here keeps the model unavailable; Triton shows this message as the reason.
            raise pb.TritonModelException(f"hotswap: {e}") from e
        except Exception as e:  # not one of ours (the user's factory, the compiler): say which model, keep the trace
            log.exception("model %s: loading failed", model_name)
            raise pb.TritonModelException(f"hotswap: model {model_name!r}: {type(e).__name__}: {e}") from e

    def _start(self, pb: Any, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.io = parse_model_io(config)
        model_name = args["model_name"]
        gpu = args.get("model_instance_kind", "CPU") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu"
        repository = Path(args["model_repository"]).parent  # args give the model's own directory
        add_search_paths(args["model_repository"])  # factories in the model folder (the version folder is there)
        settings = parse_settings(self.io.parameters, model_name=model_name, device=device,
                                  model_repository=repository)
        self._string_version = self.io.version_output
        if self.io.version_output and (problem := string_output_problem(
                np.__version__, utf8_declared=bool(self.io.version_utf8_width))):
            log.warning("model %s: %s", model_name, problem)
            self._string_version = not self.io.version_utf8_width
        self._cut_versions: set[str] = set()
        self._backend = TritonMetricsBackend(pb, {"model": model_name,
                                                  "instance": args.get("model_instance_name", "")})
        self.service = HotswapService(settings, self.io.inputs, self.io.outputs, self.io.max_batch,
                                      HotswapMetrics(self._backend))
        try:
            self.service.start()
        except BaseException:
            self._backend.close()
            raise
        self._device = torch.device(device)
        self._parameters = response_parameters_supported(pb)
        forms = [f"output {VERSION_OUTPUT}" if self._string_version else "",
                 f"output {VERSION_UTF8_OUTPUT}" if self.io.version_utf8_width else "",
                 "response parameter hotswap_weights_version" if self._parameters else ""]
        log.info("model %s: weights version on every response as %s", model_name,
                 " and ".join(filter(None, forms)) or "nothing (declare an output to get it)")

    def _input(self, request: Any, name: str) -> torch.Tensor:
        t = _pb().get_input_tensor_by_name(request, name)
        if t is None:
            raise HotswapError(f"request has no input {name!r}")
        # DLPack for CPU and GPU alike: the stub's as_numpy() builds arrays with the numpy ABI it was
        # compiled for, and under numpy 2 they came out with zero strides (seen with Triton 2.51)
        return torch.utils.dlpack.from_dlpack(t.to_dlpack())

    def _output(self, name: str, tensor: torch.Tensor) -> Any:
        # an own, contiguous allocation per response: a row slice of the batch carries a storage offset, and
        # compiled code may return other strides (Triton reads an output as dense row-major bytes);
        # DLPack, not numpy, for the reason given in _input
        own = tensor.detach().clone(memory_format=torch.contiguous_format)
        capsule = torch.to_dlpack(own)  # type: ignore[attr-defined]
        return _pb().Tensor.from_dlpack(name, capsule)

    def _version_outputs(self, version: str, n: int) -> list[Any]:
        """The declared version outputs for ``n`` rows (:mod:`serving.triton.version_output`)."""
        out = []
        if self._string_version:
            out.append(_pb().Tensor(VERSION_OUTPUT, np.array([[version.encode()]] * n, dtype=np.object_)))
        if width := self.io.version_utf8_width:
            data, cut = encode_utf8(version, width)
            if cut and version not in self._cut_versions:
                self._cut_versions.add(version)
                log.warning("version %r is longer than the %d bytes of output %s: responses carry its first %d "
                            "bytes; declare a larger width (dims) in config.pbtxt", version, width,
                            VERSION_UTF8_OUTPUT, width)
            row = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            out.append(self._output(VERSION_UTF8_OUTPUT, row.expand(n, width)))
        return out

    def execute(self, requests: list[Any]) -> list[Any]:
        """Batch the requests through the engine; a failure answers its requests with an error."""
        pb = _pb()
        responses: list[Any] = [None] * len(requests)
        inputs: list[list[torch.Tensor] | None] = []
        for i, req in enumerate(requests):
            try:
                inputs.append([self._input(req, spec.name) for spec in self.io.inputs])
            except Exception as e:  # a bad request never takes the others down
                inputs.append(None)
                responses[i] = pb.InferenceResponse(error=pb.TritonError(str(e)))
        if self._device.type == "cuda":
            # GPU inputs were written on Triton's stream, which torch's stream does not wait for
            torch.cuda.synchronize(self._device)
        good = [i for i, x in enumerate(inputs) if x is not None]
        sizes = [inputs[i][0].shape[0] for i in good]  # type: ignore[index]
        for group in split_batches(sizes, self.io.max_batch):
            idx = [good[g] for g in group]
            try:
                batch = [torch.cat([inputs[i][k] for i in idx]) for k in range(len(self.io.inputs))]  # type: ignore[index]
                outputs, version = self.service.infer_versioned(batch)
                offset = 0
                for i in idx:
                    n = inputs[i][0].shape[0]  # type: ignore[index]
                    tensors = [self._output(spec.name, out[offset:offset + n])
                               for spec, out in zip(self.io.outputs, outputs, strict=True)]
                    tensors += self._version_outputs(version, n)
                    responses[i] = (pb.InferenceResponse(output_tensors=tensors,
                                                         parameters={"hotswap_weights_version": version})
                                    if self._parameters else pb.InferenceResponse(output_tensors=tensors))
                    offset += n
                if self._device.type == "cuda":  # Triton reads the outputs on its own stream
                    torch.cuda.current_stream(self._device).synchronize()
            except Exception as e:
                log.exception("model %s: inference failed", self.service.settings.model_name)
                for i in idx:
                    responses[i] = pb.InferenceResponse(error=pb.TritonError(f"hotswap: {e}"))
        return responses

    def finalize(self) -> None:
        """Stop the watcher and worker with a timeout: unloading never hangs."""
        service = getattr(self, "service", None)
        if service is not None:
            service.close(timeout=10.0)
        backend = getattr(self, "_backend", None)
        if backend is not None:
            backend.close()
