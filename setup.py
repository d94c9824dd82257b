from setuptools import find_packages, setup

setup(
    name="megatron-raptr",
    version="0.1.0",
    description="RaPTr (progressive random-path subnetwork training) for NVIDIA Megatron-Core",
    packages=find_packages(include=["megatron_raptr", "megatron_raptr.*"]),
    python_requires=">=3.10",
    # psutil: megatron-core's torch_dist checkpoint writer needs it but does not declare it.
    install_requires=["megatron-core>=0.16.1", "torch>=2.6", "numpy", "sentencepiece", "psutil"],
    extras_require={"test": ["pytest"]},
)
