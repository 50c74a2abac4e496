# crawlwarden gateway image: `crawlwarden run` as a non-root user, nothing else.
#
#   docker build -t crawlwarden:0.1.0 .
#   docker run -p 8080:8080 -p 9090:9090 -v "$PWD/examples/policy.yaml:/etc/crawlwarden/policy.yaml:ro" crawlwarden:0.1.0
#
# The Helm chart (helm/crawlwarden) runs it with the same user ids and ports.

# -- build: install the package and its dependencies into a virtual environment --------------
FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/crawlwarden
WORKDIR /src
# Only what `pip install .` reads (.dockerignore keeps the rest, tests included, out of the context).
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY addons ./addons
# The package without its dev extras (pip also compiles the bytecode: the root file system is
# read-only in the chart).
RUN /opt/crawlwarden/bin/pip install .
# `crawlwarden run` restarts itself under python -O (proxy/cli.py), which reads other bytecode
# files (*.opt-1.pyc): compiled here too, or every start would compile everything again.
RUN /opt/crawlwarden/bin/python -O -m compileall -q /opt/crawlwarden/lib

# -- run ---------------------------------------------------------------------------------------
FROM python:3.12-slim
# Numeric ids: Kubernetes' runAsNonRoot can only check a numeric USER. The chart uses the same.
RUN groupadd --system --gid 10001 crawlwarden \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/crawlwarden \
       --no-create-home --shell /usr/sbin/nologin crawlwarden \
    && mkdir -p /var/lib/crawlwarden /etc/crawlwarden \
    && chown 10001:10001 /var/lib/crawlwarden
COPY --from=build /opt/crawlwarden /opt/crawlwarden
ENV PATH=/opt/crawlwarden/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/crawlwarden \
    CRAWLWARDEN_DATA_DIR=/var/lib/crawlwarden \
    CRAWLWARDEN_LISTEN=0.0.0.0:8080 \
    CRAWLWARDEN_ADMIN=0.0.0.0:9090
WORKDIR /var/lib/crawlwarden
# The data dir holds the CA, the fetch-log spool and (without PostgreSQL) the SQLite fetch log.
VOLUME ["/var/lib/crawlwarden"]
USER 10001:10001
# proxy, admin API (/healthz, /readyz, /metrics)
EXPOSE 8080 9090
# SIGTERM drains: no new connections, requests in flight finish (30 s at most), fetch log flushed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["crawlwarden"]
CMD ["run", "--policy", "/etc/crawlwarden/policy.yaml"]
