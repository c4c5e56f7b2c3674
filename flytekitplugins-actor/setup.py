from setuptools import find_namespace_packages, setup

PLUGIN_NAME = "actor"
microlib_name = f"flytekitplugins-{PLUGIN_NAME}"

setup(
    name=microlib_name,
    version="0.1.0",
    description="Actors for Flyte: run tasks on warm, reusable replicas (the user SDK and the replica worker)",
    license="Apache-2.0",
    packages=find_namespace_packages(include=["flytekitplugins.*"]),
    package_data={"flytekitplugins.actor.protocol": ["*.proto"]},
    python_requires=">=3.11,<3.13",
    install_requires=[
        # The worker runs tasks through flytekit's own entrypoint internals, which change between minors.
        "flytekit>=1.16.0,<1.17",
        "grpcio>=1.85,<2",
        "protobuf>=7.35,<8",
    ],
    entry_points={
        "flytekit.plugins": [f"{PLUGIN_NAME}=flytekitplugins.{PLUGIN_NAME}"],
        "console_scripts": ["flyte-actor-replica=flytekitplugins.actor.worker.replica:main"],
    },
)
