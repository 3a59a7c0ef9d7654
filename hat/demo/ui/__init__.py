"""The demo's page in Gradio: one module a tab, composed by :func:`hat.demo.ui.page.build_ui`.

``handlers`` says how every handler runs (errors as toasts, model calls on threads of their own,
ZeroGPU), ``shared`` what the tabs share (the session's state, the API's hidden slots); each tab
module lays its tab out and wires its events and its named API endpoints.
"""
