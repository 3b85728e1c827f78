"""Reading pickles from elsewhere (e.g. Mini-ImageNet caches) without running their code.

``pickle.load`` executes whatever callable a file names, so an untrusted
pickle can run anything. ``load_plain_pickle`` admits only what data needs:
plain containers and scalars (built by the pickle machine itself, not by
calling globals) and the few numpy globals that rebuild an array or a dtype.
Any other global - ``os.system``, ``builtins.eval``, a class - is refused
before it is looked up, so nothing it names ever runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from fewshot_nsl.errors import UserError

# (module, name) pairs a numpy array pickle needs, under numpy 1 and numpy 2 module names.
ALLOWED_GLOBALS = frozenset(
    (f"numpy.{core}.{module}", name)
    for core in ("core", "_core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
) | frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "set"), ("builtins", "frozenset"),
               ("collections", "OrderedDict"), ("_codecs", "encode")})  # fmt: skip


class _Refused(pickle.UnpicklingError):
    """The file names a global that plain data does not need."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise _Refused(f"{module}.{name} is not plain data")
        return super().find_class(module, name)


def load_plain_pickle(path: Path) -> Any:
    """The object in ``path`` if it is made only of containers, scalars and numpy arrays."""
    try:
        with open(path, "rb") as handle:
            return _PlainDataUnpickler(handle).load()
    except _Refused as error:
        raise UserError(
            f"{path} holds more than plain data ({error}); refusing to unpickle it: it could run code. "
            "Re-create the file from a trusted source"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise UserError(f"{path} is not a readable pickle ({type(error).__name__}: {error}); re-create it") from None
