@echo off
rem Daedalus, headless: serve the back half of a model to Icarus nodes.
rem Set MESH_WEIGHTS below (or in the environment), then double-click. Extra arguments go to
rem "python -m comfyui_mesh.server" (--help lists them). MESH_DRY_RUN=1 prints the command.
setlocal
rem ---- edit these, or set them in the environment -------------------------------------------
if not defined MESH_WEIGHTS set "MESH_WEIGHTS="
if not defined MESH_N_BLOCKS set "MESH_N_BLOCKS=4"
if not defined MESH_PORT set "MESH_PORT=7777"
rem 127.0.0.1 = this PC only (same-host pair); 0.0.0.0 = serve another PC (open the firewall port)
if not defined MESH_BIND set "MESH_BIND=127.0.0.1"
if not defined MESH_DTYPE set "MESH_DTYPE=auto"
rem ----------------------------------------------------------------------------------------------
call "%~dp0_common.bat"
if not defined MESH_DEVICE set "MESH_DEVICE=%MESH_DEFAULT_DEVICE%"
if "%MESH_DRY_RUN%"=="1" goto :launch
if not exist "%PY%" goto :no_venv
if not defined MESH_COMFY goto :no_comfy
:launch
set "COMFYUI_PATH=%MESH_COMFY%"
set "WEIGHTS_ARG="
if defined MESH_WEIGHTS set WEIGHTS_ARG=--weights "%MESH_WEIGHTS%"
%RUN% "%PY%" -m comfyui_mesh.server --n-blocks %MESH_N_BLOCKS% --port %MESH_PORT% --bind %MESH_BIND% --device %MESH_DEVICE% --dtype %MESH_DTYPE% --comfyui "%MESH_COMFY%" %WEIGHTS_ARG% %*
if errorlevel 1 if not "%MESH_DRY_RUN%"=="1" pause
exit /b %errorlevel%
:no_venv
echo [mesh] error: no virtual environment at %MESH_VENV%: run scripts\install.bat first
pause
exit /b 2
:no_comfy
echo [mesh] error: ComfyUI not found: run scripts\install.bat, or set COMFYUI_PATH
pause
exit /b 2
