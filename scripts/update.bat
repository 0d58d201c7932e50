@echo off
rem Update: this checkout (git pull), the pinned ComfyUI release (only a ComfyUI that install.bat
rem cloned into .vendor\ComfyUI; yours is left alone), the requirements, then the install check.
rem Pin another release with: set COMFYUI_TAG=v0.29.0. MESH_DRY_RUN=1 prints the commands.
setlocal
call "%~dp0_common.bat"
if "%MESH_DRY_RUN%"=="1" goto :go
if not exist "%PY%" goto :no_venv
if not defined MESH_COMFY goto :no_venv
:go
if exist "%MESH_REPO%\.git" (
  echo [mesh] updating ComfyUI-Mesh
  %RUN% git -C "%MESH_REPO%" pull --ff-only
)
if /i "%MESH_COMFY%"=="%MESH_REPO%\.vendor\ComfyUI" (
  echo [mesh] moving ComfyUI to %COMFYUI_TAG%
  %RUN% git -C "%MESH_COMFY%" fetch --depth 1 origin tag %COMFYUI_TAG%
  %RUN% git -C "%MESH_COMFY%" checkout -q %COMFYUI_TAG%
) else (
  echo [mesh] ComfyUI at %MESH_COMFY% is yours: update it your usual way, this pack is tested with %COMFYUI_TAG%
)
set "REQS=%MESH_VENV%\comfyui-requirements.txt"
%RUN% "%PY%" -c "import re,sys; src,dst=sys.argv[1:]; open(dst,'w').writelines(l for l in open(src) if not re.match(r'(torch|torchvision|torchaudio)\s*([<>=~!]|$)', l))" "%MESH_COMFY%\requirements.txt" "%REQS%"
%RUN% "%PY%" -m pip install -r "%REQS%"
%RUN% "%PY%" -m pip install -e "%MESH_REPO%[codecs]"
%RUN% "%PY%" -m comfyui_mesh.server.check --comfyui "%MESH_COMFY%"
if not "%MESH_DRY_RUN%"=="1" pause
exit /b 0
:no_venv
echo [mesh] error: nothing installed yet: run scripts\install.bat first
pause
exit /b 2
