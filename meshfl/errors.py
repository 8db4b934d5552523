"""One typed exception hierarchy for all of meshfl.

Every error has a short machine-readable ``code`` and a readable message. Errors that cross the
wire travel as ``{"code": ..., "message": ...}`` and are raised again on the other side as
:class:`RemoteError` carrying the same code, so callers can branch on codes, not on strings.
"""

from __future__ import annotations


class MeshflError(Exception):
    """Base of every meshfl error."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, details: dict | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details or {}

    def to_wire(self) -> dict:
        """The form an error takes inside an error reply."""
        out = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class WireError(MeshflError):
    """A message that cannot be decoded or does not match its declared type.

    Codes: ``bad_envelope``, ``bad_version``, ``unknown_type``, ``missing_field``, ``bad_field``,
    ``bad_dtype``, ``bad_shape``, ``bad_length``, ``too_many_frames``, ``oversize``.
    """

    code = "bad_message"


class CryptoError(MeshflError):
    """Bad signature, undecryptable box, malformed or insecure key material."""

    code = "crypto"


class StoreError(MeshflError):
    """The LMDB store refused an operation (unknown table, bad state transition, ...)."""

    code = "store"


class AuditError(StoreError):
    """The audit chain does not verify; ``details["index"]`` is the first bad record."""

    code = "audit_tampered"


class TransportError(MeshflError):
    """A link-level failure: peer unknown or unreachable, transport closed."""

    code = "transport"


class PeerUnavailable(TransportError):
    code = "peer_unavailable"


class RequestTimeout(TransportError):
    code = "timeout"


class NotTrusted(TransportError):
    code = "not_trusted"


class RemoteError(MeshflError):
    """The remote peer answered a request with an error reply (its code is kept)."""

    code = "remote"

    @classmethod
    def from_wire(cls, payload: dict, peer: str | None = None) -> "RemoteError":
        code = str(payload.get("code", "remote"))
        message = str(payload.get("message", "remote error"))
        details = payload.get("details") if isinstance(payload.get("details"), dict) else {}
        if peer:
            details = {**details, "peer": peer}
        return cls(message, code=code, details=details)


class ConfigError(MeshflError):
    """A home folder or configuration that cannot be used as given."""

    code = "config"


class DatasetError(MeshflError):
    """A dataset that cannot be registered or read.

    Codes: ``not_found``, ``bad_format``, ``bad_target``, ``bad_name``, ``exists``,
    ``unknown_dataset``, ``dataset_missing``.
    """

    code = "dataset"


class PlanError(MeshflError):
    """A training plan this node will not run, or cannot find.

    Codes: ``plan_not_approved``, ``plan_rejected``, ``unknown_plan``, ``bad_plan``.
    """

    code = "plan"


class MissingDependency(MeshflError):
    """An optional extra that a feature needs is not installed; the message names the pip command."""

    code = "missing_dependency"

    def __init__(self, what: str, extra: str):
        super().__init__(f"{what} is not installed: pip install meshfl[{extra}]", details={"extra": extra})


class LaunchError(MeshflError):
    """A mesh that cannot be launched as asked (``meshfl launch slurm``).

    Codes: ``not_in_allocation``, ``bad_launch``, ``setup_failed``, ``setup_timeout``.
    """

    code = "launch"


class HostedError(MeshflError):
    """A hosted-model request the host refuses; the model is left untouched (meshfl/hosted).

    Codes: ``unknown_model``, ``unknown_version``, ``stale_version``, ``not_accepted``,
    ``duplicate_diff``, ``bad_shape``, ``bad_dtype``, ``bad_diff``, ``non_finite``, ``oversize``,
    ``bad_samples``, ``secagg_async``, ``plan_not_approved``, ``model_exists``, ``phase_closed`` (a
    secure cycle's step sent after its phase ended).
    """

    code = "hosted"
