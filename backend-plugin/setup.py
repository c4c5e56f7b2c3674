from setuptools import find_packages, setup

setup(
    name="flyte-actors-agent",
    version="0.1.0",
    description="The Flyte agent (connector) that runs actor tasks on fleets of warm replicas",
    license="Apache-2.0",
    packages=find_packages(include=["flyte_actor_agent", "flyte_actor_agent.*"]),
    python_requires=">=3.11,<3.13",
    install_requires=[
        "flytekitplugins-actor==0.1.0",
        "grpcio>=1.85,<2",
        "kubernetes>=29,<37",
        "prometheus-client>=0.20,<1",
        "grpcio-health-checking>=1.85,<2",
    ],
    entry_points={
        "console_scripts": ["flyte-actor-agent=flyte_actor_agent.server:main"],
        "flytekitplugins.actor.local_fleet": ["embedded=flyte_actor_agent.embedded:local_agent"],
    },
)
