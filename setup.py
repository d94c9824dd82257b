from setuptools import find_packages, setup

setup(
    name="megatron-raptr",
    version="0.1.0",
    description="RaPTr (progressive random-path subnetwork training) for NVIDIA Megatron-Core",
    packages=find_packages(include=["megatron_raptr", "megatron_raptr.*"]),
    python_requires=">=3.10",
    # megatron-core: the versions CI tests (0.16.1 on Python 3.11, 0.19.2 on Python 3.12), and
    # between them; the Megatron internals relied on are checked at import (megatron_internals.py).
    # psutil: megatron-core's torch_dist checkpoint writer needs it but does not declare it.
    install_requires=["megatron-core>=0.16.1,<=0.19.2", "torch>=2.6", "numpy", "sentencepiece", "psutil"],
    extras_require={"test": ["pytest"]},
    classifiers=["Programming Language :: Python :: 3.11", "Programming Language :: Python :: 3.12"],
)
