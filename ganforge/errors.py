"""Every error ganforge raises on purpose, in one tree.

    GanforgeError
     ├── UsageError            bad user input caught before any work (CLI exit 2)
     │    ├── DataError        a data set, image or mask that cannot be used
     │    └── CheckpointError  a file that is not a ganforge checkpoint
     ├── RepositoryError       a model repository that cannot be served as it is
     ├── ServerStartError      the local Triton server did not come up
     └── ServerError           a request that the server refused or could not answer
          ├── ServerUnavailable   nothing answers at the URL (refused, down, restarting)
          │    └── TLSError       the TLS handshake failed: certificate required or refused,
          │                       unknown CA, name mismatch, TLS on one side only
          ├── Timeout             the deadline passed before an answer
          ├── ModelNotFound       the server does not serve that model or version
          ├── InvalidArgument     the server rejected the request's content
          └── PermissionDenied    a restricted protocol without its key

Messages name the field, the bad value and what is allowed. The CLI prints them as one
`Error: …` line.
"""


class GanforgeError(Exception):
    """Base of every ganforge error."""

    exit_code = 1


class UsageError(GanforgeError):
    exit_code = 2


class DataError(UsageError):
    pass


class CheckpointError(UsageError):
    pass


class RepositoryError(GanforgeError):
    pass


class ServerStartError(GanforgeError):
    pass


class ServerError(GanforgeError):
    pass


class ServerUnavailable(ServerError):
    pass


class TLSError(ServerUnavailable):
    """Not transient: retrying with the same certificates fails the same way."""


class Timeout(ServerError):
    pass


class ModelNotFound(ServerError):
    pass


class InvalidArgument(ServerError):
    pass


class PermissionDenied(ServerError):
    pass
