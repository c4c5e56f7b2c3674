"""Development install of the whole project: ``pip install -e .[dev]`` sets up the flytekit plugin
(``flytekitplugins-actor/``) and the agent (``backend-plugin/``) from this checkout in one step.
Each of the two also has its own ``setup.py`` to build the packages users install."""

from setuptools import find_namespace_packages, find_packages, setup

plugin_packages = find_namespace_packages("flytekitplugins-actor", include=["flytekitplugins.*"])
agent_packages = find_packages("backend-plugin", include=["flyte_actor_agent", "flyte_actor_agent.*"])

setup(
    name="flyte-actors",
    version="0.1.0",
    description="Actors for Flyte: development install of flytekitplugins-actor and the actor agent",
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=plugin_packages + agent_packages,
    package_dir={
        **{p: "flytekitplugins-actor/" + p.replace(".", "/") for p in plugin_packages},
        **{p: "backend-plugin/" + p.replace(".", "/") for p in agent_packages},
    },
    package_data={
        "flytekitplugins.actor": ["py.typed"],
        "flytekitplugins.actor.protocol": ["*.proto"],
        "flyte_actor_agent": ["py.typed"],
    },
    # The union of the two packages' requirements (see their setup.py for why each range is what it is).
    python_requires=">=3.10,<3.13",
    install_requires=[
        "flytekit>=1.16.0,<1.17",
        "grpcio>=1.62.0,<2",
        "protobuf>=4.25.1,<8",
        "kubernetes>=29,<37",
        "prometheus-client>=0.20,<1",
        "grpcio-health-checking>=1.62.0,<2",
    ],
    extras_require={
        # grpcio-tools is not here: `make proto` installs the pinned one into its own .venv-proto.
        "dev": [
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            "kubernetes-validate>=1.28,<2",
        ],
        # Benchmark-only: the peers `make bench` times beside actors (benchmarks/peers.py). Never runtime deps.
        "bench": [
            "ray>=2.50,<3",
            "dask>=2025.1",
            "distributed>=2025.1",
        ],
    },
    entry_points={
        "flytekit.plugins": ["actor=flytekitplugins.actor"],
        "console_scripts": [
            "flyte-actor-replica=flytekitplugins.actor.worker.replica:main",
            "flyte-actor-agent=flyte_actor_agent.server:main",
        ],
        "flytekitplugins.actor.local_fleet": ["embedded=flyte_actor_agent.embedded:local_agent"],
    },
)
