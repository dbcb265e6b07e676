"""The CPU libraries' build: objects compiled once per digest and shared between libraries, local headers in the
digest, concurrent builds in turn, failures give ``None`` and leave no file behind."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor

from compressdit.native_build import build_library, compile_flags, compiler_for


def _sources(folder):
    folder.mkdir()
    (folder / "scale.h").write_text("#define SCALE 3\n")
    (folder / "triple.c").write_text('#include "scale.h"\nint triple(int x) { return SCALE * x; }\n')
    (folder / "twice.c").write_text("int twice(int x) { return 2 * x; }\n")
    return folder


def _objects(cache):
    return {p.name: p.stat().st_mtime_ns for p in (cache / "native").glob("*.o")}


def test_libraries_share_objects_and_a_header_change_rebuilds_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSDIT_CACHE", str(tmp_path / "cache"))
    src = _sources(tmp_path / "src")
    flags = compile_flags(False)
    both = build_library("both", [src / "triple.c", src / "twice.c"], flags)
    if compiler_for(src / "twice.c") is None:  # no C compiler: no library (the callers' PyTorch paths run)
        assert both is None
        return
    assert both.triple(5) == 15 and both.twice(5) == 10
    first = _objects(tmp_path / "cache")
    assert sorted(n.split("-")[0] for n in first) == ["triple", "twice"]
    alone = build_library("alone", [src / "twice.c"], flags)  # its object is the first library's
    assert alone.twice(4) == 8 and _objects(tmp_path / "cache") == first
    (src / "scale.h").write_text("#define SCALE 4\n")  # only triple.c includes it
    again = build_library("both", [src / "triple.c", src / "twice.c"], flags)
    assert again.triple(5) == 20
    now = _objects(tmp_path / "cache")
    assert len(now) == 3 and {n: t for n, t in now.items() if n.startswith("twice")} == {
        n: t for n, t in first.items() if n.startswith("twice")}


def test_a_compile_error_or_no_compiler_gives_none_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSDIT_CACHE", str(tmp_path / "cache"))
    src = _sources(tmp_path / "src")
    (src / "broken.c").write_text("int broken(int x) { return x +; }\n")
    if compiler_for(src / "twice.c") is None:
        assert build_library("broken", [src / "broken.c"], compile_flags(False)) is None
        return
    assert build_library("broken", [src / "twice.c", src / "broken.c"], compile_flags(False)) is None
    native = tmp_path / "cache" / "native"
    built = [p.name.split("-")[0] for p in native.iterdir() if p.name != ".lock"]
    assert built == ["twice"]  # the good object, nothing half-written
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert compiler_for(src / "twice.c") is None
    assert build_library("other", [src / "triple.c"], compile_flags(False)) is None


def test_a_library_of_c_and_cxx_sources_links_with_the_cxx_flags_on_cxx_sources_only(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSDIT_CACHE", str(tmp_path / "cache"))
    src = _sources(tmp_path / "src")
    (src / "wrap.cpp").write_text('#include <vector>\nextern "C" int twice(int);\n'
                                  'extern "C" int wrap(int x) { std::vector<int> v{x}; return twice(v[0]) + STEP; }\n')
    lib = build_library("mixed", [src / "wrap.cpp", src / "twice.c"], compile_flags(False), ("-std=c++17", "-DSTEP=1"))
    if compiler_for(src / "wrap.cpp") is None or compiler_for(src / "twice.c") is None:
        assert lib is None
        return
    assert isinstance(lib, ctypes.CDLL) and lib.wrap(3) == 7  # -DSTEP reached the C++ source


def test_builds_started_together_compile_each_source_once(tmp_path, monkeypatch):
    """Two builds of one library at once (the suite's two workers, two ranks): the second waits for the first's lock,
    then finds its objects and library; every source is compiled once."""
    monkeypatch.setenv("COMPRESSDIT_CACHE", str(tmp_path / "cache"))
    src = _sources(tmp_path / "src")
    cc = compiler_for(src / "twice.c")
    if cc is None or shutil.which("sh") is None:
        return
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "logging-cc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nsleep 1\nexec {cc} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(wrapper))
    sources = [src / "triple.c", src / "twice.c"]
    with ThreadPoolExecutor(2) as pool:
        libraries = list(pool.map(lambda _: build_library("both", sources, compile_flags(False)), range(2)))
    assert all(lib is not None and lib.triple(2) == 6 and lib.twice(2) == 4 for lib in libraries)
    compiles = [line for line in log.read_text().splitlines() if " -c " in f" {line} "]
    assert sorted(os.path.basename(line.split(" -c ")[1].split()[0]) for line in compiles) == ["triple.c", "twice.c"]
