# One image for the five Loyalist services and the bootstrap job:
#   docker run IMAGE python -m services.profile
#   docker run IMAGE python -m loyalist.devstack bootstrap
# Python dependencies install with the same constraints CI tested (requirements.lock).
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# cassandra-driver and the faust C extensions build from source when no wheel matches.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends build-essential libev-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml requirements.lock ./
COPY loyalist ./loyalist
COPY services ./services
COPY schemas ./schemas
RUN python -m venv /opt/loyalist \
 && /opt/loyalist/bin/pip install -q --upgrade pip wheel \
 && /opt/loyalist/bin/pip install -q -c requirements.lock .

FROM python:3.11-slim-bookworm
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libev4 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --create-home loyalist
COPY --from=build /opt/loyalist /opt/loyalist
WORKDIR /app
# Sources beside the installed package: `python -m services.<name>` and the migrations resolve from here.
COPY --chown=loyalist:loyalist loyalist ./loyalist
COPY --chown=loyalist:loyalist services ./services
COPY --chown=loyalist:loyalist schemas ./schemas
ENV PATH=/opt/loyalist/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOYALIST_HOST=0.0.0.0 \
    LOYALIST_HOME=/app/.loyalist \
    LOYALIST_LOG_JSON=true
USER 10001
EXPOSE 8001 8002 8003 8004 8005
# The default command is the ingest service; compose and Helm name the service explicitly.
CMD ["python", "-m", "services.ingest"]
