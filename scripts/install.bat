@echo off
rem Install (or repair) everything Daedalus needs, then check it. Safe to run again.
rem Steps: virtualenv (MESH_VENV, default .venv) - torch (CUDA build with an NVIDIA driver, else
rem CPU; kept if already installed) - ComfyUI (COMFYUI_PATH, or the ComfyUI this pack sits in, or
rem a clone of release %COMFYUI_TAG% into .vendor\ComfyUI) - ComfyUI's requirements - this
rem package (pip install -e) - python -m comfyui_mesh.server.check.
rem Options (environment): PYTHON (default: py -3, else python), MESH_TORCH=cpu or cuda,
rem MESH_TORCH_INDEX (a wheel index URL), MESH_DRY_RUN=1 (print the commands instead).
setlocal
call "%~dp0_common.bat"

echo [mesh] 1/6 virtual environment: %MESH_VENV%
if exist "%PY%" (
  echo [mesh]     exists, kept
  goto :pip
)
set "BASE_PY=%PYTHON%"
if not defined BASE_PY (
  where py >nul 2>nul && set "BASE_PY=py -3"
)
if not defined BASE_PY set "BASE_PY=python"
%RUN% %BASE_PY% -m venv "%MESH_VENV%"
if errorlevel 1 goto :fail
:pip
%RUN% "%PY%" -m pip install --upgrade pip wheel
if errorlevel 1 goto :fail

echo [mesh] 2/6 torch
set "WANT=%MESH_TORCH%"
if defined WANT goto :torch_install
if defined MESH_TORCH_INDEX goto :torch_install
if not exist "%PY%" goto :torch_install
"%PY%" -c "import torch" >nul 2>nul
if errorlevel 1 goto :torch_install
echo [mesh]     kept the installed torch
goto :comfy
:torch_install
if not defined WANT set "WANT=cpu"
if not defined MESH_TORCH where nvidia-smi >nul 2>nul && set "WANT=cuda"
set "INDEX=%MESH_TORCH_INDEX%"
rem On Windows the default wheel is CPU-only: the CUDA build comes from PyTorch's own index.
if not defined INDEX if "%WANT%"=="cuda" set "INDEX=https://download.pytorch.org/whl/cu128"
echo [mesh]     installing the %WANT% build
if defined INDEX (
  %RUN% "%PY%" -m pip install torch torchvision torchaudio --index-url "%INDEX%"
) else (
  %RUN% "%PY%" -m pip install torch torchvision torchaudio
)
if errorlevel 1 goto :fail

:comfy
echo [mesh] 3/6 ComfyUI
if defined MESH_COMFY (
  echo [mesh]     using %MESH_COMFY%
  goto :reqs
)
set "MESH_COMFY=%MESH_REPO%\.vendor\ComfyUI"
if not "%MESH_DRY_RUN%"=="1" where git >nul 2>nul || goto :no_git
echo [mesh]     cloning ComfyUI %COMFYUI_TAG% into %MESH_COMFY%
%RUN% git clone --depth 1 --branch %COMFYUI_TAG% %MESH_COMFYUI_URL% "%MESH_COMFY%"
if errorlevel 1 goto :fail

:reqs
echo [mesh] 4/6 ComfyUI's requirements (torch kept as installed)
set "REQS=%MESH_VENV%\comfyui-requirements.txt"
%RUN% "%PY%" -c "import re,sys; src,dst=sys.argv[1:]; open(dst,'w').writelines(l for l in open(src) if not re.match(r'(torch|torchvision|torchaudio)\s*([<>=~!]|$)', l))" "%MESH_COMFY%\requirements.txt" "%REQS%"
if errorlevel 1 goto :fail
%RUN% "%PY%" -m pip install -r "%REQS%"
if errorlevel 1 goto :fail

echo [mesh] 5/6 ComfyUI-Mesh (editable) and its codecs
%RUN% "%PY%" -m pip install -e "%MESH_REPO%[codecs]"
if errorlevel 1 goto :fail
if "%MESH_DRY_RUN%"=="1" (
  echo + echo %MESH_COMFY% ^> "%MESH_VENV%\comfyui-path.txt"
) else (
  > "%MESH_VENV%\comfyui-path.txt" echo %MESH_COMFY%
)

echo [mesh] 6/6 install check
%RUN% "%PY%" -m comfyui_mesh.server.check --comfyui "%MESH_COMFY%"
echo [mesh] done. Start the server: scripts\daedalus_gui.bat (window) or scripts\daedalus.bat
if not "%MESH_DRY_RUN%"=="1" pause
exit /b 0

:no_git
echo [mesh] error: git not found: install Git for Windows, or set COMFYUI_PATH to an existing ComfyUI
pause
exit /b 2
:fail
echo [mesh] error: the step above failed; fix it and run install.bat again (finished steps are kept)
pause
exit /b 1
