"""Storage against a real loopback S3 server and a local folder."""

from __future__ import annotations

import os

import pytest

from sia_pipeline.io.storage import StorageError, open_storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_root")


def test_put_get_list_size(root, tmp_path):
    st = open_storage(root)
    st.check_writable()
    st.put_bytes(b"hello", "a/b.txt")
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 1000)
    st.put_file(f, "a/c.bin")
    assert st.get_bytes("a/b.txt") == b"hello"
    if not root.startswith("s3://"):  # atomic temp files must not leave data private (0600)
        umask = os.umask(0)
        os.umask(umask)
        for name in ("a/b.txt", "a/c.bin"):
            assert (tmp_path / "root" / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert st.size("a/c.bin") == 1000
    assert st.size("a/missing") is None
    assert st.list("a") == ["a/b.txt", "a/c.bin"]
    with pytest.raises(FileNotFoundError, match="missing"):
        st.get_bytes("a/missing")
    st.delete("a/b.txt")
    assert not st.exists("a/b.txt")
    # folder semantics: a sibling sharing the prefix is neither listed nor deleted
    st.put_bytes(b"1", "a_old/x")
    st.put_bytes(b"2", "a/b.txt.bak")
    assert st.list("a") == ["a/b.txt.bak", "a/c.bin"]
    st.delete("a/b.txt")
    assert st.exists("a/b.txt.bak") and st.exists("a_old/x")


def test_missing_bucket_is_one_line(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    with pytest.raises(StorageError, match=r"bucket does not exist: s3://no-such-bucket"):
        open_storage("s3://no-such-bucket/x").check_writable()


def test_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="cannot reach S3 endpoint"):
        open_storage("s3://b/x").check_writable()


def test_bad_scheme():
    with pytest.raises(StorageError, match="unsupported URL scheme"):
        open_storage("ftp://host/x")


def test_put_if_absent(root):
    st = open_storage(root)
    st.check_writable()
    assert st.put_if_absent("lease.json", b"first") is True
    assert st.put_if_absent("lease.json", b"second") is False
    assert st.get_bytes("lease.json") == b"first"
    assert st.list("") == ["lease.json"]  # no temp file left behind
    st.delete("lease.json")
    assert st.put_if_absent("lease.json", b"third") is True
    assert st.get_bytes("lease.json") == b"third"


def test_put_if_absent_one_winner(tmp_path):
    """Of many concurrent writers exactly one gets True, and its bytes are what is stored.

    Local only: S3 makes the conditional PUT atomic, but moto checks and then writes, so
    concurrent writers can both win there (the sequential S3 case is tested above).
    """
    from concurrent.futures import ThreadPoolExecutor

    st = open_storage(tmp_path / "root")
    st.check_writable()
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: st.put_if_absent("x/lock", f"w{i}".encode()), range(8)))
    assert won.count(True) == 1
    assert st.get_bytes("x/lock") == f"w{won.index(True)}".encode()
