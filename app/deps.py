"""``Annotated`` dependencies: the app's settings, job store and dispatcher (set by create_app)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from fprotoseg.app.dispatch import Dispatcher
from fprotoseg.worker.service.jobstore import JobStore
from fprotoseg.worker.service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
