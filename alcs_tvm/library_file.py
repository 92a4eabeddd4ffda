"""A compiled library file judged from its headers, without loading it: whole or cut short, a TVM library or not,
and for which architecture. Loading is what TVM does (:mod:`alcs_tvm.run`, :mod:`alcs_tvm.rpc`); this module needs
neither TVM nor numpy, so ``alcs run`` refuses a bad library before it loads them."""
from __future__ import annotations

import struct
import tarfile
from pathlib import Path

__all__ = ["check_library", "elf_machine", "RELAX_LIBRARY_SYMBOL"]

#: the symbol through which a library exported by ``tvm.compile(...).export_library`` carries its Relax executable
RELAX_LIBRARY_SYMBOL = b"__tvm_ffi__library_bin"
_TVM_SYMBOL_PREFIX = b"__tvm_ffi_"
_ELF_TYPES = {1: "an object file (.o)", 2: "an executable", 4: "a core dump"}


def check_library(path, relax: bool = False) -> None:
    """Raise ``ValueError`` (``FileNotFoundError`` if missing) unless ``path`` is a whole TVM library: an ELF
    shared object whose segments and sections all lie inside the file and that exports TVM functions (with
    ``relax``: a Relax executable), or a readable ``.tar`` of objects.

    Loading a cut-short library maps pages past the end of the file, and the first touch of one kills the loading
    process with SIGBUS: here ``alcs run`` would die with exit 135 and no message; on a device the server's
    session worker dies, which ends TVM's RPC server loop. The headers say how long the file must be, so a
    truncated copy is caught without loading it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such library: {path}")
    if path.suffix == ".tar":
        _check_tar(path)
        return
    size = path.stat().st_size
    with open(path, "rb") as fh:
        def reach(end: int, what: str) -> None:
            if end > size:
                raise ValueError(f"{path.name} is cut short: {size} bytes, but its {what} runs to byte {end} "
                                 f"(an interrupted copy or build? copy or build it again)")

        def read(offset: int, count: int, what: str) -> bytes:
            reach(offset + count, what)
            fh.seek(offset)
            return fh.read(count)

        ident = fh.read(16)
        if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise ValueError(f"{path.name} is not a shared library (no ELF header): export it with "
                             f"`alcs compile` or tvm.compile(...).export_library()")
        wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
        header = struct.Struct(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"))
        (e_type, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = \
            header.unpack(read(16, header.size, "ELF header"))
        if e_type != 3:
            raise ValueError(f"{path.name} is {_ELF_TYPES.get(e_type, f'an ELF file of type {e_type}')}, not a "
                             f"shared library")
        program = read(phoff, phentsize * phnum, "program header table")
        for i in range(phnum):
            entry = program[i * phentsize:(i + 1) * phentsize]
            if wide:
                p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(order + "IIQQQQ", entry)
            else:
                p_type, p_offset, _, _, p_filesz = struct.unpack_from(order + "IIIII", entry)
            if p_type == 1:  # PT_LOAD: mapped from the file
                reach(p_offset + p_filesz, f"loadable segment {i}")
        table = read(shoff, shentsize * shnum, "section header table")
        sections = []
        for i in range(shnum):
            entry = table[i * shentsize:(i + 1) * shentsize]
            if wide:
                _, sh_type, _, _, sh_offset, sh_size, sh_link = struct.unpack_from(order + "IIQQQQI", entry)
            else:
                _, sh_type, _, _, sh_offset, sh_size, sh_link = struct.unpack_from(order + "IIIIIII", entry)
            if sh_type not in (0, 8):  # SHT_NULL and SHT_NOBITS (.bss) take no room in the file
                reach(sh_offset + sh_size, f"section {i}")
            sections.append((sh_type, sh_offset, sh_size, sh_link))
        names = set()
        for sh_type, sh_offset, sh_size, sh_link in sections:
            if sh_type != 11 or sh_link >= len(sections):  # SHT_DYNSYM, with its string table
                continue
            strings = read(sections[sh_link][1], sections[sh_link][2], "dynamic string table")
            symbols = read(sh_offset, sh_size, "dynamic symbol table")
            step = 24 if wide else 16
            for k in range(0, len(symbols) - step + 1, step):
                start = struct.unpack_from(order + "I", symbols, k)[0]
                names.add(strings[start:strings.find(b"\0", start)])
    wanted = RELAX_LIBRARY_SYMBOL if relax else _TVM_SYMBOL_PREFIX
    if not any(name.startswith(wanted) for name in names):
        what = "no Relax executable" if relax else "no TVM functions"
        raise ValueError(f"{path.name} holds {what} (no {wanted.decode()}* symbol): build it with `alcs compile` "
                         f"or tvm.compile(...).export_library()")


def _check_tar(path: Path) -> None:
    try:
        with tarfile.open(path) as tar:
            members = tar.getnames()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{path.name} is not a whole tar archive ({err}): copy or export it again") from None
    if not any(name.endswith((".o", ".obj")) for name in members):
        raise ValueError(f"{path.name} holds no object files: export it with tvm.compile(...).export_library()")


_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm"}


def elf_machine(path) -> str | None:
    """The architecture of an ELF file (``"x86_64"``, ``"aarch64"``, ...), or None if it is not ELF."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
    except OSError:
        return None
    if head[:4] != b"\x7fELF":
        return None
    return _ELF_MACHINES.get(struct.unpack("<H", head[18:20])[0], "other")

