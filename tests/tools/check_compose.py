"""Checks deploy/docker-compose.yml without a Docker engine: valid YAML of the expected shape,
and consistent with the code (deploy/local.sh test runs it).

- the five services, each with a healthcheck; two allot-worker replicas;
- allot-api and allot-worker start only once PostgreSQL, Redis and RabbitMQ are healthy;
- every ALLOT_ variable it sets is one the binaries read (the `env = "ALLOT_..."` of the code);
- the Dockerfile builds and ships both binaries.

usage: check_compose.py deploy/docker-compose.yml
"""

import pathlib
import re
import sys

import yaml

SERVICES = {"rabbitmq", "postgres", "redis", "allot-api", "allot-worker"}
BACKING = {"rabbitmq", "postgres", "redis"}


def fail(message: str) -> int:
    print(f"docker-compose check: {message}")
    return 1


def known_variables(root: pathlib.Path) -> set[str]:
    names = set()
    for source in root.glob("*/src/**/*.rs"):
        names.update(re.findall(r'env = "(ALLOT_[A-Z_]+)"', source.read_text(encoding="utf-8")))
        names.update(re.findall(r'env::var\("(ALLOT_[A-Z_]+)"\)', source.read_text(encoding="utf-8")))
    return names


def main(path: str) -> int:
    compose_path = pathlib.Path(path).resolve()
    root = compose_path.parent.parent
    compose = yaml.safe_load(compose_path.read_text(encoding="utf-8"))
    services = compose.get("services", {})
    if set(services) != SERVICES:
        return fail(f"services are {sorted(services)}, expected {sorted(SERVICES)}")
    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test")
        if not test:
            return fail(f"{name} has no healthcheck")
    if services["allot-worker"].get("deploy", {}).get("replicas") != 2:
        return fail("allot-worker should run two replicas")
    known = known_variables(root)
    for name in ("allot-api", "allot-worker"):
        depends = services[name].get("depends_on", {})
        for backing in BACKING:
            if depends.get(backing, {}).get("condition") != "service_healthy":
                return fail(f"{name} must wait for {backing} to be healthy")
        variables = {key for key in services[name].get("environment", {}) if key.startswith("ALLOT_")}
        unknown = variables - known
        if unknown:
            return fail(f"{name} sets variables no binary reads: {sorted(unknown)}")
        if services[name].get("command") != [name]:
            return fail(f"{name} should run the {name} binary")
    dockerfile = (root / "Dockerfile").read_text(encoding="utf-8")
    for binary in ("allot-api", "allot-worker"):
        if f"target/release/{binary}" not in dockerfile:
            return fail(f"the Dockerfile does not ship {binary}")
    print(f"{compose_path.name}: {len(services)} services, healthchecks and dependencies in place; "
          f"ALLOT_ variables known to the code ({len(known)} in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
