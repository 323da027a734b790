# uvgate image: the gateway plus the two stubs (uvgate, uvgate-backend-stub, uvgate-auth-stub).
#   docker build -t uvgate .
#   docker run --rm -p 8080:8080 -v $PWD/my.toml:/etc/uvgate/uvgate.toml:ro uvgate
# Run it with an init (`docker run --init`, or `init: true` in compose) so PID 1 reaps orphans.

# The full image has the C compiler that mypyc needs for the compiled hot path (see setup.py);
# the runtime image gets only the built wheel.
FROM python:3.11 AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml setup.cfg setup.py README.md ./
COPY proxy ./proxy
COPY backend_stub ./backend_stub
COPY auth_stub ./auth_stub
COPY devstack ./devstack
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 uvgate \
    && useradd --system --uid 10001 --gid uvgate --no-create-home --shell /usr/sbin/nologin uvgate
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
COPY configs/docker.toml /etc/uvgate/uvgate.toml
COPY configs/production.example.toml /etc/uvgate/production.example.toml
# Numeric (uvgate:uvgate above), so the runtime and a host's policy (runAsNonRoot) need not resolve the name.
USER 10001:10001
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/readyz', timeout=2)"]
ENTRYPOINT ["uvgate"]
CMD ["--config", "/etc/uvgate/uvgate.toml"]
