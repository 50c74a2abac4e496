#!/usr/bin/env sh
# Copy the Grafana dashboards and alert rules of dashboards/ into the chart.
#
# Helm's .Files reaches only files inside the chart, so helm/crawlwarden/dashboards/ keeps copies
# of dashboards/*.json and dashboards/alerts.yaml (copies, not symlinks: `helm package` and GitOps
# tools such as Argo CD refuse or flatten links that leave the chart). tests/test_helm_chart.py
# fails when the copies differ from dashboards/; run this script after editing a dashboard.
#
#   helm/sync-dashboards.sh           copy (and drop copies whose original is gone)
#   helm/sync-dashboards.sh --check   exit 1, naming the files, if the chart's copies differ
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
src="$root/dashboards"
dst="$root/helm/crawlwarden/dashboards"
check=false
case "${1:-}" in
  --check) check=true ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

# The files the chart embeds.
sources() {
  [ -d "$src" ] || return 0
  for f in "$src"/*.json "$src"/alerts.yaml; do
    [ -f "$f" ] && basename "$f"
  done
  return 0
}
copies() {
  [ -d "$dst" ] || return 0
  for f in "$dst"/*.json "$dst"/alerts.yaml; do
    [ -f "$f" ] && basename "$f"
  done
  return 0
}

differ=0
for name in $(sources); do
  if ! cmp -s "$src/$name" "$dst/$name"; then
    differ=1
    if $check; then
      echo "helm/crawlwarden/dashboards/$name differs from dashboards/$name" >&2
    else
      mkdir -p "$dst"
      cp "$src/$name" "$dst/$name"
      echo "copied dashboards/$name"
    fi
  fi
done
for name in $(copies); do
  if [ ! -f "$src/$name" ]; then
    differ=1
    if $check; then
      echo "helm/crawlwarden/dashboards/$name has no original in dashboards/" >&2
    else
      rm "$dst/$name"
      echo "removed helm/crawlwarden/dashboards/$name"
    fi
  fi
done

if $check && [ "$differ" -ne 0 ]; then
  echo "run helm/sync-dashboards.sh to update the chart's copies" >&2
  exit 1
fi
exit 0
