#!/usr/bin/env python3
"""Scrapes a layerwise /metrics endpoint and parses it with the official Prometheus client's
OpenMetrics parser; prints one JSON object: each family's type and label names, and the
samples of the job named. Exits 1 when the text does not parse.

    python3 scripts/metrics_check.py URL [TOKEN]
"""

import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main():
    url = sys.argv[1]
    req = urllib.request.Request(url)
    if len(sys.argv) > 2:
        req.add_header("Authorization", f"Bearer {sys.argv[2]}")
    with urllib.request.urlopen(req, timeout=60) as r:
        content_type = r.headers.get("Content-Type", "")
        text = r.read().decode()
    families = {}
    for f in text_string_to_metric_families(text):
        labels = sorted({k for s in f.samples for k in s.labels})
        families[f.name] = {
            "type": f.type,
            "unit": f.unit,
            "labels": labels,
            "samples": [[s.name, s.labels, s.value] for s in f.samples],
        }
    print(json.dumps({"content_type": content_type, "families": families}))


if __name__ == "__main__":
    main()
