"""CSVs as spreadsheets write them, end to end: the user's columns come back, nothing is
dropped silently, and a file we cannot read is refused at its line.

Real kube-apiserver, Job controller, MinIO, operator and worker pods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from imagebatch_common.contract import Compression, image_key
from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import (
    OUTPUT_BUCKET,
    OperatorProcess,
    apply,
    public_base,
    wait_batch,
)
from tests.e2e.conftest import imagebatch as batch
from tests.support.servers import ImageServer

pytestmark = pytest.mark.e2e


def read(storage: Minio, key: str) -> bytes:
    response = storage.get_object(OUTPUT_BUCKET, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def events(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    out = json.loads(
        cluster.kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            f"involvedObject.name={name}",
            "-o",
            "json",
        )
    )
    items: list[dict[str, Any]] = out["items"]
    return items


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


def test_extra_columns_and_leading_zero_serials_come_back_as_written(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    storage: Minio,
    images: ImageServer,
) -> None:
    s = images.url
    text = (
        "S. No.,Product Name,Category,Input Image Urls,Notes\r\n"
        f"007,SKU7,Shoes,{s}/a.jpg,  two spaces kept  \r\n"
        f'010,"Hat, wool",Hats,"{s}/c.jpg,{s}/d.jpg",=SUM(1)\r\n'
    )
    apply(cluster, namespace, batch("columns", {"inline": text}))
    wait_batch(cluster, namespace, "columns", ("Succeeded",))
    prefix = f"{namespace}/columns/"

    def out(path: str) -> str:
        return f"{public_base(cluster)}/{image_key(prefix, s + path, Compression())}"

    assert read(storage, f"{prefix}output.csv").decode() == (
        "S. No.,Product Name,Category,Input Image Urls,Notes,Output Image Urls\r\n"
        f"007,SKU7,Shoes,{s}/a.jpg,  two spaces kept  ,{out('/a.jpg')}\r\n"
        f'010,"Hat, wool",Hats,"{s}/c.jpg,{s}/d.jpg",\'=SUM(1),'
        f'"{out("/c.jpg")},{out("/d.jpg")}"\r\n'
    )


def test_an_unquoted_url_list_is_fetched_whole_and_the_user_is_told(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    storage: Minio,
) -> None:
    from tests.support.servers import photo

    server = ImageServer(
        {
            "/x.jpg": (photo(64, 48, 31), "image/jpeg"),
            "/y.png": (photo(64, 48, 32, "PNG"), "image/png"),
        }
    )
    try:
        s = server.url
        text = f"S. No.,Product Name,Input Image Urls\n1,SKU1,{s}/x.jpg,{s}/y.png\n"
        apply(cluster, namespace, batch("unquoted", {"inline": text}))
        ib = wait_batch(cluster, namespace, "unquoted", ("Succeeded",))
        assert server.hits == {"/x.jpg": 1, "/y.png": 1}  # b.png is not dropped
    finally:
        server.close()
    assert ib["status"]["images"]["succeeded"] == 2
    validated = conditions(ib)["Validated"]["message"]
    assert "unquoted URL list" in validated and "quote the URL cell" in validated
    warnings = [e for e in events(cluster, namespace, "unquoted") if e["type"] == "Warning"]
    assert any(e["reason"] == "CSVNotice" and "line 2" in e["message"] for e in warnings)
    prefix = f"{namespace}/unquoted/"
    output = read(storage, f"{prefix}output.csv").decode().splitlines()
    # The row's URL cell is written quoted, holding both URLs: the columns stay aligned.
    assert output[1].startswith(f'1,SKU1,"{s}/x.jpg,{s}/y.png","')


def test_a_windows_1252_export_is_refused_at_its_line_with_the_fix(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    csv_bytes = (
        "S. No.,Product Name,Input Image Urls\r\n"
        "1,Plain,https://img.example.com/a.jpg\r\n"
        "2,\u201cSmart\u201d quotes,https://img.example.com/b.jpg\r\n"
    ).encode("cp1252")
    path = tmp_path / "products.csv"
    path.write_bytes(csv_bytes)
    cluster.kubectl(
        "create", "configmap", "products", "-n", namespace, f"--from-file=products.csv={path}"
    )
    apply(
        cluster,
        namespace,
        batch("excel", {"configMapKeyRef": {"name": "products", "key": "products.csv"}}),
    )
    ib = wait_batch(cluster, namespace, "excel", ("Failed",))
    problems = ib["status"]["validationErrors"]
    assert len(problems) == 1
    assert problems[0]["row"] == 3
    assert "CSV UTF-8" in problems[0]["message"]
    table = cluster.kubectl("get", "ib", "excel", "-n", namespace)
    header, row = table.splitlines()[:2]
    # Columns are aligned under their headings; an empty one (WEBHOOK) is blank there.
    at = header.index("REASON")
    assert row[at:].split()[0] == "InvalidCSV"
    wide = cluster.kubectl("get", "ib", "excel", "-n", namespace, "-o", "wide")
    assert "MESSAGE" in wide and "CSV UTF-8" in wide
