"""sdrt runtime: run an exported Stable Diffusion bundle with numpy and an engine backend.

Never imports torch; `import sdrt` must work on a machine that has only the runtime installed.
"""

__version__ = "0.1.0"
