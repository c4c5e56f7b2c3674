from setuptools import find_packages, setup

setup(
    name="flyte-actors-agent",
    version="0.1.0",
    description="The Flyte agent (connector) that runs actor tasks on fleets of warm replicas",
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=find_packages(include=["flyte_actor_agent", "flyte_actor_agent.*"]),
    package_data={"flyte_actor_agent": ["py.typed"]},
    python_requires=">=3.10,<3.13",
    install_requires=[
        "flytekitplugins-actor==0.1.0",
        # The connector API (flytekit.extend.backend.base_connector) first shipped in flytekit 1.16.
        "flytekit>=1.16.0,<1.17",
        "grpcio>=1.62.0,<2",
        "kubernetes>=29,<37",
        "prometheus-client>=0.20,<1",
        # flytekit[connector] caps this at 1.68.0, so an agent image that also serves flytekit's own connectors
        # resolves (to protobuf 5.x); on its own the agent takes the newest.
        "grpcio-health-checking>=1.62.0,<2",
    ],
    entry_points={
        "console_scripts": ["flyte-actor-agent=flyte_actor_agent.server:main"],
        "flytekitplugins.actor.local_fleet": ["embedded=flyte_actor_agent.embedded:local_agent"],
    },
)
