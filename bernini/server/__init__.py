"""The job server: `/v1/videos` over HTTP (the openai SDK's `client.videos`), a durable SQLite queue, one model load.

Modules: folders (where files live, what a response may say about them), store (the job table), uploads
(request bodies streamed into the job's folder), fields (request fields -> a case and settings, checked like
a case file), jobs (the service the routes call), render (the one place a job is rendered), worker (the
thread that renders queued jobs), auth (who may call, and the limits), metrics, app (FastAPI routes) and
launch (`bernini serve`).
"""
