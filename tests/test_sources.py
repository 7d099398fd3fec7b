import pytest

from raycxr.errors import DataError
from raycxr.sources import list_sources, scan_source
from raycxr.sources.kermany import patient_key


@pytest.mark.parametrize("name, key", [
    ("IM-0115-0001.jpeg", "IM-115"),
    ("IM-0429-0001-0002.jpeg", "IM-429"),
    ("NORMAL2-IM-1345-0001.jpeg", "NORMAL2-1345"),
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1000_virus_1681.jpeg", "person1000"),  # one key across types: conservative grouping
    ("person7_bacteria_24.jpeg", "person7"),
    ("odd-name.jpeg", "file:odd-name"),
])
def test_kermany_patient_key(name, key):
    assert patient_key(name) == key


def test_kermany_scan_reads_labels_and_details(sample_dir):
    records = list(scan_source("kermany", sample_dir))
    assert len(records) == 300
    assert all(r.labels == {"pneumonia": 0, "no_finding": 1} for r in records if "NORMAL" in r.rel_path)
    assert all(r.labels == {"pneumonia": 1, "no_finding": 0} for r in records if "PNEUMONIA" in r.rel_path)
    assert {r.label_detail for r in records} == {"normal", "bacteria", "virus"}
    assert all(not r.rel_path.startswith("/") for r in records)


def test_unknown_source_and_missing_root(tmp_path):
    assert "kermany" in list_sources()
    with pytest.raises(DataError, match="use one of: .*kermany"):
        scan_source("nope", tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        scan_source("kermany", tmp_path / "missing")
