"""Control plane of the eBPF static file server: build/load BPF, fill the kernel cache, serve the rest."""

__version__ = "0.1.0"
