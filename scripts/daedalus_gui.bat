@echo off
rem The Daedalus window: choose the model, n_blocks, device..., Start. For a same-host pair pin
rem the GPU first: set CUDA_VISIBLE_DEVICES=1 then run this. Extra arguments go to the window
rem (--toy: a model-free test server). MESH_DRY_RUN=1 prints the command.
setlocal
call "%~dp0_common.bat"
if "%MESH_DRY_RUN%"=="1" goto :launch
if not exist "%PYW%" goto :no_venv
:launch
if defined MESH_COMFY set "COMFYUI_PATH=%MESH_COMFY%"
%RUN% start "Daedalus" "%PYW%" -m comfyui_mesh.server.gui %*
exit /b 0
:no_venv
echo [mesh] error: no virtual environment at %MESH_VENV%: run scripts\install.bat first
pause
exit /b 2
