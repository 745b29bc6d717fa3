"""Rule download_data: fetch a registered data set or URL, verify its checksum, rename into place."""

import sys

import _common

_common.start(snakemake)

from scvae_torch.download import DownloadError, fetch, fetch_dataset  # noqa: E402

spec = snakemake.params.spec
options = {"sha256": spec.get("sha256"), "md5": spec.get("md5")}
try:
    if "url" in spec:
        digest = fetch(spec["url"], snakemake.output[0], **options)
    else:
        digest = fetch_dataset(spec["name"], snakemake.output[0], **options)
except DownloadError as err:
    print(f"error: {err}")
    sys.exit(1)
print(f"{snakemake.output[0]}: sha256 {digest}")
