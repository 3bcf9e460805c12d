"""The Gradio demo: every task in the browser, one model load, one GPU or a torchrun group, safe by default.

Exports what callers outside the package use (gradio_demo.py, the tests); the page's and the
service's helpers stay in their modules.
"""

from bernini.demo.page import Page, build_app, request_from_page
from bernini.demo.serve import Access, access_from, base_settings, launch_options, main, parse_args, start
from bernini.demo.service import Cancelled, DemoRequest, DemoService, JobRunner, RenderError

__all__ = [
    "Access", "Cancelled", "DemoRequest", "DemoService", "JobRunner", "Page", "RenderError", "access_from", "base_settings",
    "build_app", "launch_options", "main", "parse_args", "request_from_page", "start",
]
