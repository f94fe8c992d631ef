"""The Files API of the HTTP front (``/v1/files``: upload, list, retrieve, content, delete), a mixin of
``FilesAndBatches``: a batch reads its input from a file here, and writes its output and error files here."""

from __future__ import annotations

from fastapi import Request as HttpRequest
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from engine.app._endpoint_wire import HEADER_TENANT, ApiError, StoredFile, cursor_page, new_id, tenant_of

__all__ = ["MAX_FILE_BYTES", "FileRoutes"]

MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
# The files a Message Batch keeps (its output and error files) are Anthropic's batch's own: not listed here.
_HIDDEN = "file-msgbatch_"


class FileRoutes:
    """Needs ``files``, ``state`` and ``_now``."""

    def _file(self, file_id: str, tenant: str, param: str = "file_id") -> StoredFile:
        """A file of the Files API that ``tenant`` made; another tenant's is answered as one that does not exist
        (before, any caller read, and deleted, every tenant's files). A Message Batch's files are its own (read
        by its results route): fetched or deleted here by id, a delete emptied the batch's results (a review)."""
        f = self.files.get(file_id) if not file_id.startswith(_HIDDEN) else None
        if f is None or f.tenant != tenant:
            raise ApiError(404, f"No such File object: {file_id} (each tenant sees the files it made: send the "
                                f"{HEADER_TENANT} it was made with)", param=param)
        return f

    def _add_file(self, filename: str, purpose: str, data: bytes, file_id: str | None = None, *,
                  tenant: str) -> StoredFile:
        """In memory, and on disk with a state directory (``OSError``: not there, the caller decides)."""
        f = StoredFile(file_id or new_id("file-"), filename, purpose, data, int(self._now()), tenant)
        self.files[f.id] = f
        if self.state is not None:
            self.state.save_file(f, strict=True)
        return f

    async def create_file(self, http: HttpRequest) -> dict:
        tenant = tenant_of(http.headers)
        if not http.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "POST /v1/files takes multipart/form-data with the fields 'file' and "
                                "'purpose'")
        async with http.form(max_files=1, max_fields=4) as form:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose != "batch":
                raise ApiError(400, f"purpose {purpose!r} is not supported here; upload batch input files "
                                    "with purpose 'batch'", param="purpose")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "the form needs a 'file' part: the JSONL batch input file", param="file")
            data = await upload.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ApiError(413, f"the file is over {MAX_FILE_BYTES:,} bytes (OpenAI's limit for a batch "
                                "input file); split it into several batches", param="file")
        try:
            return self._add_file(upload.filename or "upload.jsonl", purpose, data, fid := new_id("file-"),
                                  tenant=tenant).view()
        except OSError as exc:  # taken with 200 and gone at the next start (a helper's hunt: a full disk)
            self.files.pop(fid, None)
            raise self.state.no_room(exc, "the file") from None

    async def list_files(self, http: HttpRequest, purpose: str | None = None, limit: str | None = None,
                         after: str | None = None, order: str = "desc") -> dict:
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order {order!r} must be 'asc' or 'desc'", param="order")
        tenant = tenant_of(http.headers)
        items = [f.view() for f in self.files.values() if (purpose is None or f.purpose == purpose)
                 and f.tenant == tenant and not f.id.startswith(_HIDDEN)]
        return cursor_page(items[::-1] if order == "desc" else items, after=after, limit=limit,
                           default_limit=10_000, max_limit=10_000)

    async def get_file(self, http: HttpRequest, file_id: str) -> dict:
        return self._file(file_id, tenant_of(http.headers)).view()

    async def delete_file(self, http: HttpRequest, file_id: str) -> dict:
        self._file(file_id, tenant_of(http.headers))
        del self.files[file_id]  # a batch made from it keeps its parsed lines (and on disk, its input)
        if self.state is not None:
            self.state.drop_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    async def file_content(self, http: HttpRequest, file_id: str) -> Response:
        return Response(self._file(file_id, tenant_of(http.headers)).data, media_type="application/octet-stream")
