"""The Gradio demo: every task in the browser, one model load, one GPU or a torchrun group, safe by default."""

from bernini.demo.page import Page, build_app, request_from_page
from bernini.demo.serve import Access, access_from, build_parser, launch_options, main, parse_args, start
from bernini.demo.serve import base_settings as base_settings
from bernini.demo.service import Cancelled, DemoRequest, DemoResult, DemoService, JobRunner, RenderError
from bernini.parallel.peers import DistPeers, LocalPeers

__all__ = [
    "Access", "Cancelled", "DemoRequest", "DemoResult", "DemoService", "DistPeers", "JobRunner", "LocalPeers", "Page", "RenderError",
    "access_from", "build_app", "build_parser", "launch_options", "main", "parse_args", "request_from_page", "start",
]
