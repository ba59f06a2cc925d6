import json
from collections import Counter

import zstandard

from sourcelm.tokens.documents import iter_documents


def test_a_zstd_file_cut_mid_frame_is_counted_not_silently_empty(tmp_path):
    data = b"".join(json.dumps({"id": str(i), "text": f"hello {i}", "source": "s"}).encode() + b"\n"
                    for i in range(200))
    packed = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "cut.jsonl.zst").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "whole.jsonl.zst").write_bytes(packed)
    skipped = Counter()
    assert len(list(iter_documents(tmp_path / "whole.jsonl.zst", skipped))) == 200 and not skipped
    list(iter_documents(tmp_path / "cut.jsonl.zst", skipped))
    assert skipped == Counter({"corrupt_stream": 1})
