"""The ganforge client: generation (and, with later models, denoising and inpainting) over
Triton's gRPC API, with errors mapped honestly from gRPC status codes.

    >>> from ganforge.serving.client import Client
    >>> with Client("localhost:8001") as c:
    ...     images = c.generate("dcgan_shapes", seed=42, count=8)   # (8, 64, 64, 3) uint8

Nothing here imports torch.
"""

from __future__ import annotations

import os
import queue
import re
import time
from dataclasses import dataclass

import numpy as np

from ganforge.errors import (GanforgeError, InvalidArgument, ModelNotFound, PermissionDenied,
                             ServerError, ServerUnavailable, Timeout, TLSError,
                             UsageError)
from ganforge.serving.inpaint import MAX_SIDE
from ganforge.serving.sampler import SEED_MAX

# Image batches exceed gRPC's 4 MiB default; 64 images of 256x256x3 are 12 MiB.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# The gRPC channel arguments of every ganforge client (this one, batch jobs, the benchmarks).
MESSAGE_SIZE_ARGS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

# A request that outlives its timeout is abandoned, not cancelled: the caller stops waiting on
# its own clock and the call runs out on the server, its answer dropped. Cancelling would gain
# nothing (Triton does not stop a request that is executing) and can crash the server: Triton
# before 2.59 has races in its gRPC frontend between a cancellation and the answer (fixed in
# 2.53, 2.57 and 2.59), and the nvidia-pytriton wheel's server is 2.51 (docs/performance.md,
# "Timeouts"). The gRPC deadline stays, far behind the timeout, as a guard against a hung server.
ABANDON_GRACE_S = 120.0
# How long close() lets abandoned requests finish before the channel (and they) are closed.
ABANDON_DRAIN_S = 10.0


def grpc_deadline(timeout: float | None) -> float | None:
    """The gRPC deadline behind a request timeout of `timeout` seconds (None: none)."""
    return None if timeout is None else timeout + ABANDON_GRACE_S


def timed_out(model: str | None, url: str, timeout: float) -> Timeout:
    return Timeout(f"request to {model or 'the server'} at {url} timed out: no answer within "
                   f"{timeout:g} s")


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files a client speaks TLS with (CLI: --tls-ca, --tls-cert, --tls-key); None for a
    plaintext client. Only used to say why a handshake failed."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


def tls_probe(url: str, timeout: float = 3.0) -> str | None:
    """What the server at `url` does with a TLS handshake that presents no certificate and
    checks none: "tls" it answers over TLS, "closed" it completes the handshake and then closes
    the connection (it wants a client certificate: mutual TLS), "plain" it does not speak TLS,
    None nothing could be reached. The stdlib ssl module, on the error path only: gRPC reports a
    server that closes the connection as "Socket closed", whatever the reason."""
    import socket
    import ssl

    host, _, port = url.rpartition(":")
    host = host.strip("[]") or "localhost"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                s.settimeout(1.0)
                try:
                    return "closed" if s.recv(1) == b"" else "tls"
                except socket.timeout:
                    return "tls"
                except OSError:  # ssl.SSLError included: an alert after the handshake
                    return "closed"
    except ssl.SSLError:
        return "plain"
    except (OSError, ValueError):
        return None


def tls_error(msg: str, url: str, tls: TLSFiles | None) -> TLSError | None:
    """The TLS cause of a gRPC UNAVAILABLE error `msg`, as a TLSError naming the flag to change;
    None when the failure is not a TLS one."""
    where = f"TLS handshake with {url} failed"
    verify = re.search(r"CERTIFICATE_VERIFY_FAILED:?\s*([^:]*)", msg)
    if verify:
        why = verify.group(1).strip() or "certificate verify failed"
        trusted = f"--tls-ca {tls.ca}" if tls and tls.ca else "the system's CAs (no --tls-ca)"
        return TLSError(f"{where}: the server's certificate is not trusted by {trusted} ({why}); "
                        f"pass --tls-ca with the CA that signed the server's certificate")
    if "Hostname Verification Check failed" in msg or "hostname mismatch" in msg.lower():
        host = url.rpartition(":")[0].strip("[]")
        return TLSError(f"{where}: the server's certificate does not name {host!r} (hostname "
                        f"verification failed); connect with a --url host that the certificate "
                        f"lists in its subjectAltName")
    if "WRONG_VERSION_NUMBER" in msg:
        return TLSError(f"{where}: the server does not speak TLS on that port (wrong version "
                        f"number); leave out --tls-ca/--tls-cert/--tls-key or check the port")
    if "Socket closed" not in msg:
        return None
    probe = tls_probe(url)
    if tls is None:
        if probe in ("tls", "closed"):
            return TLSError(f"{url} speaks TLS and closed the plaintext connection: pass --tls-ca "
                            f"with the CA that signed the server's certificate"
                            + (" (and --tls-cert/--tls-key: it also asks for a client certificate)"
                               if probe == "closed" else ""))
        return None
    if probe == "plain":
        return TLSError(f"{where}: the server does not speak TLS on that port (it closed the "
                        f"connection); leave out --tls-ca/--tls-cert/--tls-key or check the port")
    if probe == "closed":
        if not tls.cert:
            return TLSError(f"{where}: the server requires a client certificate (mutual TLS) and "
                            f"closed the connection; pass --tls-cert and --tls-key signed by the "
                            f"CA the server trusts")
        return TLSError(f"{where}: the server refused the client certificate --tls-cert {tls.cert} "
                        f"and closed the connection; it must be signed by the CA the server trusts "
                        f"(ganforge serve --tls-ca) and be valid now")
    return None


def map_error(exc: Exception, model: str | None = None, url: str = "",
              tls: TLSFiles | None = None, version: str = "") -> GanforgeError:
    """Map a tritonclient InferenceServerException to ganforge's error tree by gRPC code.
    `tls`: the client's TLS files (None: plaintext), to name the cause of a failed handshake;
    `version`: the model version the request named ("" for the server's choice)."""
    status = str(getattr(exc, "status", lambda: "")() or "")
    msg = str(getattr(exc, "message", lambda: str(exc))() or exc)
    low = msg.lower()
    if "protocol is restricted" in low or "PERMISSION_DENIED" in status or "UNAUTHENTICATED" in status:
        return PermissionDenied(f"permission denied by {url}: {msg} (a server started with "
                                f"--restricted-key needs that key: --key KEY=VALUE)")
    if "UNAVAILABLE" in status:
        return tls_error(msg, url, tls) or ServerUnavailable(f"server unavailable at {url}: {msg}")
    if "DEADLINE_EXCEEDED" in status or "deadline exceeded" in low:
        return Timeout(f"request to {model or 'the server'} at {url} timed out: {msg}")
    if "NOT_FOUND" in status or "unknown model" in low or "is not found" in low:
        what = f"model {model!r} version {version}" if version else f"model {model!r}"
        return ModelNotFound(f"{what} is not served at {url}: {msg}")
    if "INVALID_ARGUMENT" in status:
        return InvalidArgument(msg)
    return ServerError(f"{status or 'error'}: {msg}")


def check_served(model: str, version: str, served: list[str], url: str) -> None:
    """ModelNotFound, naming the versions served, unless `version` is one of `served`."""
    if version not in served:
        raise ModelNotFound(f"model {model!r} version {version} is not served at {url}; "
                            f"it serves version{'s' if len(served) > 1 else ''} {', '.join(served)}")


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UsageError(f"seed: {seed!r} is not allowed; must be an integer in [0, {SEED_MAX}]")
    if not 0 <= int(seed) <= SEED_MAX:
        raise UsageError(f"seed: {seed} is not allowed; must be in [0, {SEED_MAX}]")
    return int(seed)


def check_version(version) -> str:
    """A model version as Triton's API takes it: "" (the server's choice) or a positive integer."""
    if version is None or version == "":
        return ""
    if isinstance(version, bool) or not str(version).isdigit() or int(version) < 1:
        raise UsageError(f"model_version: {version!r} is not allowed; must be an integer >= 1 "
                         f"(or None: the server's choice, its highest version)")
    return str(int(version))


def check_count(count, max_count: int | None = None) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise UsageError(f"count: {count!r} is not allowed; must be an integer >= 1")
    hi = max_count if max_count is not None else 2**31 - 1
    if not 1 <= int(count) <= hi:
        raise UsageError(f"count: {count} is not allowed; must be in [1, {hi}]")
    return int(count)


class Client:
    """A connection to a Triton server speaking KServe v2 over gRPC.

    Args:
        url: host:port of the server's gRPC endpoint.
        timeout: seconds per request before Timeout is raised (None: wait forever); a request
            that times out is abandoned, not cancelled (see ABANDON_GRACE_S).
        ssl: use TLS; `root_certificates`, `private_key`, `certificate_chain` are PEM file paths
            (the last two for mutual TLS).
        headers: extra gRPC metadata sent with every request.
        key: (KEY, VALUE) for a server started with `--restricted-key KEY=VALUE`; sent as
            Triton's `triton-grpc-protocol-KEY` header.
    """

    def __init__(self, url: str = "localhost:8001", timeout: float | None = 60.0, ssl: bool = False,
                 root_certificates: str | None = None, private_key: str | None = None,
                 certificate_chain: str | None = None, headers: dict[str, str] | None = None,
                 key: tuple[str, str] | None = None):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url, self.timeout = url, timeout
        self.headers = dict(headers or {})
        if key is not None:
            self.headers[f"triton-grpc-protocol-{key[0]}"] = key[1]
        for flag, path in (("root_certificates", root_certificates), ("private_key", private_key),
                           ("certificate_chain", certificate_chain)):
            if path is not None and not os.path.isfile(path):
                raise UsageError(f"{flag}: {path} is not a file")
        self.tls = TLSFiles(root_certificates, certificate_chain, private_key) if ssl else None
        self._configs: dict[str, dict] = {}
        self._versions: dict[str, list[str]] = {}
        self._abandoned: list[queue.SimpleQueue] = []  # timed-out requests still on the server
        self._client = grpcclient.InferenceServerClient(
            url, ssl=ssl, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, channel_args=MESSAGE_SIZE_ARGS)

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, fn, *args, model: str | None = None, version: str = "", **kwargs):
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            raise map_error(exc, model, self.url, self.tls, version) from None

    def config(self, model: str) -> dict:
        """The model's config.pbtxt as a dict (cached per client)."""
        if model not in self._configs:
            resp = self._call(self._client.get_model_config, model, as_json=True,
                              headers=self.headers, model=model)
            self._configs[model] = resp["config"]
        return self._configs[model]

    def versions(self, model: str) -> list[str]:
        """The versions of `model` the server serves (its metadata), cached per client."""
        if model not in self._versions:
            meta = self._call(self._client.get_model_metadata, model, as_json=True,
                              headers=self.headers, model=model)
            self._versions[model] = sorted(meta.get("versions", []), key=int)
        return self._versions[model]

    def _check_served(self, model: str, version: str) -> None:
        check_served(model, version, self.versions(model), self.url)

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
              model_version: int | str | None = None) -> dict[str, np.ndarray]:
        """One inference request with named numpy inputs; returns the named outputs.
        `model_version`: the version to ask for (None: the server's choice, its highest)."""
        from tritonclient.utils import np_to_triton_dtype

        version = check_version(model_version)
        if version:
            self._check_served(model, version)

        reqs = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            t = self._grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            t.set_data_from_numpy(array)
            reqs.append(t)
        outs = [self._grpc.InferRequestedOutput(o) for o in outputs]
        if self.timeout is None:  # nothing to give up on: the plain blocking call
            result = self._call(self._client.infer, model, reqs, model_version=version, outputs=outs,
                                headers=self.headers, model=model, version=version)
            return {o: result.as_numpy(o) for o in outputs}
        answer: queue.SimpleQueue = queue.SimpleQueue()
        self._call(self._client.async_infer, model, reqs,
                   lambda result, error: answer.put((result, error)), model_version=version, outputs=outs,
                   client_timeout=grpc_deadline(self.timeout), headers=self.headers, model=model,
                   version=version)
        try:
            result, error = answer.get(timeout=self.timeout)
        except queue.Empty:  # abandoned (ABANDON_GRACE_S); close() lets it finish
            self._abandoned = [q for q in self._abandoned if q.empty()] + [answer]
            raise timed_out(model, self.url, self.timeout) from None
        if error is not None:
            raise map_error(error, model, self.url, self.tls, version) from None
        return {o: result.as_numpy(o) for o in outputs}

    # -- API -----------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready(headers=self.headers, client_timeout=self.timeout))
        except Exception:
            return False

    def models(self) -> list[dict]:
        """Every model in the server's repository: name, version, state."""
        index = self._call(self._client.get_model_repository_index, as_json=True,
                           headers=self.headers)
        return [{"name": m.get("name"), "version": m.get("version", ""), "state": m.get("state", ""),
                 "reason": m.get("reason", "")} for m in index.get("models", [])]

    def max_count(self, model: str) -> int:
        """The largest `count` a seeded generator accepts: its batch limit (one row per image)."""
        cfg = self.config(model)
        if {i["name"] for i in cfg.get("input", [])} != {"seed", "index"}:
            raise UsageError(f"model {model!r} is not a seeded generator (inputs 'seed' and 'index'); "
                             f"call generate_from_latent on a '*_generator' model")
        return int(cfg.get("max_batch_size", 0))

    def generate(self, model: str, seed: int, count: int = 1,
                 model_version: int | str | None = None) -> np.ndarray:
        """`count` images for `seed` from a seeded generator: (count, H, W, 3) uint8.

        Sends one row per image: `seed` and `index` INT64 [count, 1], images 0 .. count - 1 of
        `seed`. Same model version, same seed: byte-identical images. `model_version` names
        the version (None: the server's choice, the highest it serves); each of the calls below
        takes it too. Raises UsageError for a bad seed, count or version before sending,
        ModelNotFound for a version the server does not serve, ServerError subclasses for what
        the server says.
        """
        seed = check_seed(seed)
        count = check_count(count, self.max_count(model))
        out = self.infer(model, {"seed": np.full((count, 1), seed, np.int64),
                                 "index": np.arange(count, dtype=np.int64).reshape(count, 1)}, ["image"],
                         model_version)
        return out["image"]

    def generate_from_latent(self, model: str, latent: np.ndarray,
                             model_version: int | str | None = None) -> np.ndarray:
        """Images for your own latents, (batch, z_dim) float32, from a '*_generator' model."""
        latent = np.asarray(latent)
        cfg = self.config(model)
        inp = next((i for i in cfg.get("input", []) if i["name"] == "latent"), None)
        if inp is None:
            raise UsageError(f"model {model!r} takes no 'latent' input; use a '*_generator' model")
        z_dim = int(inp["dims"][0])
        max_batch = int(cfg.get("max_batch_size", 0))
        if latent.dtype != np.float32:
            raise UsageError(f"latent: dtype {latent.dtype} is not allowed; send float32")
        if latent.ndim != 2 or latent.shape[1] != z_dim:
            raise UsageError(f"latent: shape {list(latent.shape)} is not allowed; expected "
                             f"[batch, {z_dim}]")
        if not 1 <= latent.shape[0] <= max_batch:
            raise UsageError(f"latent: batch {latent.shape[0]} is not allowed; must be in [1, {max_batch}]")
        return self.infer(model, {"latent": latent}, ["image"], model_version)["image"]

    def _image_model(self, model: str, inputs: set[str]) -> tuple[int, int, str]:
        """(tile, max_batch_size, output name) of an image model taking exactly `inputs`; the
        tile is -1 for a model exported with --any-size."""
        cfg = self.config(model)
        names = {i["name"] for i in cfg.get("input", [])}
        if names != inputs:
            raise UsageError(f"model {model!r} takes inputs {sorted(names)}; this call needs a model "
                             f"taking {sorted(inputs)}")
        image = next(i for i in cfg["input"] if i["name"] == "image")
        return int(image["dims"][0]), max(int(cfg.get("max_batch_size", 1)), 1), cfg["output"][0]["name"]

    def denoise(self, model: str, image: np.ndarray, overlap: int | None = None,
                margin: int | None = None, model_version: int | str | None = None,
                max_side: int = MAX_SIDE) -> np.ndarray:
        """Denoise an (H, W, 3) uint8 image of any size: tiles of the model's size, overlapping
        and blended (serving/tiles.py), sent in batches of the model's max_batch_size.
        Defaults: overlap min(32, tile/2), margin min(10, overlap/2 - 1) pixels. A model
        exported with --any-size gets the whole image in one request (reflect-padded to its
        stride) when neither side passes `max_side`, else tiles of that side."""
        from ganforge.serving.inpaint import any_size_spec
        from ganforge.serving.tiles import run_tiled

        tile, max_batch, out = self._image_model(model, {"image"})
        spec = any_size_spec(self.config(model), model, max_side)
        version = check_version(model_version)   # refused before any tile is sent
        image = np.asarray(image)
        if spec is not None:
            tile = max(spec.max_side // spec.stride * spec.stride, spec.min_side)
            if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 \
                    and max(image.shape[:2]) <= tile:
                h, w = image.shape[:2]
                pad = [(0, max(spec.min_side, -(-s // spec.stride) * spec.stride) - s) for s in (h, w)]
                x = np.pad(image, [*pad, (0, 0)], mode="reflect")[None]      # (1, H', W', 3)
                return self.infer(model, {"image": x}, [out], version)[out][0, :h, :w]
        overlap = overlap if overlap is not None else min(32, tile // 2)
        margin = margin if margin is not None else min(10, overlap // 2 - 1)
        return run_tiled(image, tile, lambda b: self.infer(model, {"image": b}, [out], version)[out],
                         max_batch, overlap=overlap, margin=margin)

    def inpaint(self, model: str, image: np.ndarray, mask: np.ndarray, dilate: int = 0,
                model_version: int | str | None = None, max_side: int = MAX_SIDE) -> np.ndarray:
        """Inpaint an (H, W, 3) uint8 image of any size where `mask` ((H, W), 255 = hole) says.

        A window around each hole is sent (serving/inpaint.py): to a fixed-size model resized
        to its tile; to a model exported with --any-size at native size, padded to its stride,
        unless its longer side passes `max_side` (then resized down to it). Pixels outside the
        hole come back byte-identical. A mask without a hole returns the image unchanged.
        """
        from ganforge.masks import dilate as grow
        from ganforge.masks import to_binary
        from ganforge.serving.inpaint import any_size_spec, inpaint_image

        tile, max_batch, out = self._image_model(model, {"image", "mask"})
        spec = any_size_spec(self.config(model), model, max_side)
        version = check_version(model_version)
        m = grow(to_binary(mask), dilate)
        return inpaint_image(np.asarray(image), m, spec or tile,
                             lambda im, mk: self.infer(model, {"image": im, "mask": mk}, [out], version)[out],
                             max_batch)

    def close(self) -> None:
        """Close the channel, after letting abandoned requests finish (at most ABANDON_DRAIN_S):
        closing it cancels whatever is still in flight."""
        end = time.monotonic() + ABANDON_DRAIN_S
        for answer in self._abandoned:
            try:
                answer.get(timeout=max(end - time.monotonic(), 0.001))
            except queue.Empty:
                break  # the drain time is spent
        self._abandoned = []
        self._client.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
