"""One loader for every checkpoint this package reads: tensors and plain data only, never pickled code.

`torch.load(weights_only=False)` runs whatever a crafted `.pth` tells the unpickler to run, so a checkpoint
shared between groups could execute code on the machine that opens it. `load_checkpoint_file` uses torch's
restricted unpickler (`weights_only=True`) and allows, beyond tensors and Python's containers, only the numpy
types nnU-Net's and nnunet-cl's checkpoints hold (float64 scalars in the training log, arrays in SepaReg's
cluster state). A file that needs anything else is refused with a message naming the file and the risk.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from os.path import getsize, isfile

import numpy as np
import torch

from nnunet_cl.paths import NnUNetCLError

__all__ = ["UnsafeCheckpointError", "CorruptCheckpointError", "load_checkpoint_file", "SAFE_GLOBALS"]


class UnsafeCheckpointError(NnUNetCLError):
    """The file asks the unpickler for code (a class or function outside the allow-list)."""


class CorruptCheckpointError(NnUNetCLError):
    """The file is not a readable torch checkpoint (truncated, empty, not a checkpoint at all)."""


def _numpy_globals() -> list:
    multiarray = getattr(np, "_core", None) or np.core
    types = [multiarray.multiarray.scalar, multiarray.multiarray._reconstruct, np.ndarray, np.dtype]
    # numpy >= 1.25 pickles dtypes by their class (np.dtypes.Float64DType, ...)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        types += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return types


#: what a checkpoint may hold besides tensors and builtins
SAFE_GLOBALS = _numpy_globals()


def load_checkpoint_file(path: str, map_location="cpu") -> dict:
    """`torch.load(path, weights_only=True)` with the numpy types of nnU-Net checkpoints allowed.

    Raises UnsafeCheckpointError when the file needs pickled code (nothing of it is executed), and
    CorruptCheckpointError when it is missing, empty or not a torch checkpoint.
    """
    if not isfile(path):
        raise CorruptCheckpointError(f"Checkpoint {path} does not exist.")
    if getsize(path) == 0:
        raise CorruptCheckpointError(f"Checkpoint {path} is empty (0 bytes): a write was interrupted.")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "GLOBAL" in str(e):
            wanted = re.findall(r"GLOBAL ([\w.]+)", str(e))
            what = f"it asks for {', '.join(sorted(set(wanted)))}" if wanted else "it asks for pickled objects"
            raise UnsafeCheckpointError(
                f"Refused to load {path}: {what}, which is neither a tensor nor plain data. Loading it with "
                f"pickle could run code from the file. Fix: get the checkpoint from "
                f"a source you trust as safetensors (nnUNetv2_cl_export --safetensors), or re-save its "
                f"state dicts as plain tensors.") from None
        raise CorruptCheckpointError(f"Checkpoint {path} cannot be read ({type(e).__name__}: {e}). It is "
                                     f"probably truncated or not a torch checkpoint.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"Checkpoint {path} cannot be read ({type(e).__name__}: "
                                     f"{' '.join(str(e).split())[:200]}). It is probably truncated or "
                                     f"not a torch checkpoint.") from None
