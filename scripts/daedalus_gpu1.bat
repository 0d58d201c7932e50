@echo off
rem Daedalus pinned to GPU 1 (same-host pair: ComfyUI on the other GPU). The GPU is renumbered
rem cuda:0 inside this process. Settings as in daedalus.bat.
setlocal
set "CUDA_VISIBLE_DEVICES=1"
set "MESH_DEVICE=cuda:0"
if "%MESH_DRY_RUN%"=="1" echo + set CUDA_VISIBLE_DEVICES=1
call "%~dp0daedalus.bat" %*
exit /b %errorlevel%
