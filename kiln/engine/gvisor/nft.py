"""nftables from inside the daemon: libnftables (the library the `nft` command is built on) through
ctypes, so a ruleset change or a DNS answer's set update costs ~1 ms and no process."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

from ..base import EngineError

JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON


class Nft:
    """One libnftables context; commands are nft's own syntax, several per call (one transaction)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise EngineError(f"libnftables is not installed ({e}): install the nftables package") from e
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)
        self.lock = threading.Lock()  # a context is not thread-safe

    def run(self, commands: str, check: bool = True, as_json: bool = False) -> str:
        """Run nft commands (all or nothing); their output, or EngineError with nft's message."""
        with self.lock:
            flags = self.lib.nft_ctx_output_get_flags(self.ctx)
            self.lib.nft_ctx_output_set_flags(self.ctx, flags | JSON if as_json else flags & ~JSON)
            rc = self.lib.nft_run_cmd_from_buffer(self.ctx, commands.encode())
            out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode(errors="replace")
            err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace")
        if rc != 0 and check:
            raise EngineError(f"nft: {err.strip() or f'exit {rc}'}")
        return out
