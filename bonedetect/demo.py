"""`bonedetect demo`: the main job on the embedded default, end to end.

Migrates the SQLite database under ./var/, creates (or reuses) the tenant
"demo" with a fresh API key, starts the API on 127.0.0.1 and one real Celery
worker process (kombu's SQLAlchemy transport on SQLite), submits a batch of
synthetic radiographs plus one corrupt file over HTTP, polls the job until it
is done, prints each image's statistics (and, since the lesions are drawn by
us, the Dice of each mask against the drawn lesion), then keeps serving until
Ctrl-C.

With ``--data DIR`` (a folder in BTXRD's layout, e.g. ../shared/data/btxrd-256)
the batch is real radiographs instead: drawn from the test part of the
grouped split (training/splits/btxrd-256-grouped-v1.csv; never trained or
tuned on), with the Dice of each mask against the radiologists' outline.
Nothing is copied from DIR into the project: the files go to the demo's
own blob store under ./var/, like any upload.
"""

from __future__ import annotations

import io
import sys
import time

import numpy as np
from PIL import Image

from bonedetect.client import Client
from bonedetect.local import serve_api, start_worker, stop_process
from bonedetect.settings import Settings


def with_corrupt_file(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``files`` plus the first one cut to a third: the file that must fail alone, with its reason."""
    return [*files, ("corrupt-truncated.jpg", files[0][1][: len(files[0][1]) // 3])]


def sample_batch(n: int, seed: int = 2026) -> tuple[list[tuple[str, bytes]], dict[str, np.ndarray]]:
    """n synthetic radiographs as JPEGs (with their drawn lesion masks) and one corrupt file."""
    from training.synthetic import synthetic_jpegs

    files, truth = synthetic_jpegs(n, seed, sides=(300, 700), name="synthetic-{:03d}.jpg", first=1)
    return with_corrupt_file(files), truth


GROUPED_SPLIT = "btxrd-256-grouped-v1.csv"


def btxrd_batch(root: str, n: int, seed: int = 2026) -> tuple[list[tuple[str, bytes]], dict[str, np.ndarray], str]:
    """n radiographs of a BTXRD-layout folder, their outlines as masks, and where they came from.

    Images of the grouped split's test part when the folder's ids are in it, else any usable images."""
    from training.btxrd import load_image, load_mask, read_btxrd
    from training.split import SPLITS_DIR, read_split_csv

    dataset = read_btxrd(root)
    split = read_split_csv(SPLITS_DIR / GROUPED_SPLIT)
    held_out = [r for r in dataset.records if split.split.get(r.image_id) == "test"]
    pool, where = (held_out, f"the test part of {GROUPED_SPLIT}") if held_out else (dataset.records, "the whole folder")
    if not pool:
        raise SystemExit(f"{root}: no usable images in BTXRD's layout (python -m training.btxrd {root} --problems)")
    rng = np.random.default_rng(seed)
    picked = sorted((pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)), key=lambda r: r.image_id)
    files = [(r.image_path.name, r.image_path.read_bytes()) for r in picked]
    truth = {r.image_path.name: load_mask(r, load_image(r).shape) for r in picked}
    return with_corrupt_file(files), truth, f"{len(picked)} radiographs from {where} of {root}"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def _fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def print_results(client: Client, job_id: str, truth: dict[str, np.ndarray], real: bool = False) -> None:
    header = f"{'file':<24}{'status':<8}{'tumor':<7}{'area px':>9}{'area %':>8}{'bbox (x,y,w,h)':>22}{'reg':>5}{'p max':>7}{'dice*':>7}"
    print(header)
    print("-" * len(header))
    for img in client.images(job_id):
        name = img["filename"]
        if img["status"] != "done":
            print(f"{name:<24}{img['status']:<8}{img.get('error') or ''}")
            continue
        bbox = "-" if img["bbox_x"] is None else f"{img['bbox_x']},{img['bbox_y']},{img['bbox_w']},{img['bbox_h']}"
        d = "-"
        if name in truth:
            mask = np.array(Image.open(io.BytesIO(client.mask_png(img["image_id"]))))
            d = f"{dice(mask, truth[name]):.2f}"
        print(
            f"{name:<24}{img['status']:<8}{'yes' if img['tumor_detected'] else 'no':<7}{img['area_px']:>9}"
            f"{100 * img['area_fraction']:>7.2f}%{bbox:>22}{img['n_regions']:>5}{_fmt(img['prob_max'], '.2f'):>7}{d:>7}"
        )
    if real:
        print("* dice: the mask against the radiologists' outline in the dataset's annotation")
    else:
        print("* dice: the mask against the lesion the generator drew (synthetic data only)")


def run_demo(
    settings: Settings, n_images: int = 12, host: str = "127.0.0.1", port: int = 8000, serve: bool = True,
    data: str | None = None,
) -> int:
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker
    from db.tenants import create_tenant, issue_key
    from db.models import Tenant
    from sqlalchemy import select

    settings.ensure_home()
    print(f"database: {settings.database_url}\nbroker:   {settings.broker_url}\nblobs:    {settings.blob_url}")
    upgrade(settings.database_url)
    with make_sessionmaker(make_engine(settings.database_url)).begin() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == "demo"))
        key = issue_key(session, tenant) if tenant else create_tenant(session, "demo")[1]

    from worker.reconciler import Reconciler

    log_path = settings.home / "worker.log"
    worker = start_worker(settings, name="demo", log_path=log_path)
    api = serve_api(settings, host, port)
    reconciler = Reconciler(settings, interval=30.0)
    reconciler.start()
    print(f"API on {api.url} (worker log: {log_path})")
    try:
        client = Client(api.url, key)
        if data:
            files, truth, where = btxrd_batch(data, n_images)
            print(where)
        else:
            files, truth = sample_batch(n_images)
        t0 = time.monotonic()
        job = client.submit(files, label="demo batch")
        print(f"submitted {len(files)} files as job {job['job_id']}")

        def progress(j):
            print(f"  {j['status']:<17} {j['counts']}", flush=True)

        final = client.wait(job["job_id"], timeout=900, poll=0.5, max_poll=3.0, on_poll=progress)
        print(f"job {final['status']} in {time.monotonic() - t0:.1f} s, model {', '.join(final['model_versions'])}\n")
        print_results(client, job["job_id"], truth, real=bool(data))
        if not serve:
            return 0 if final["status"] in ("done", "done_with_errors") else 1
        print(f"\nServing on {api.url} until Ctrl-C. Open {api.url}/ in a browser with the key {key}, or try:")
        print(f"  curl -H 'Authorization: Bearer {key}' {api.url}/v1/jobs/{job['job_id']}")
        print(f"  curl -H 'Authorization: Bearer {key}' {api.url}/v1/jobs/{job['job_id']}/results.csv")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping")
        return 0
    finally:
        reconciler.stop()
        api.stop()
        stop_process(worker)


if __name__ == "__main__":
    sys.exit(run_demo(Settings.from_env()))
