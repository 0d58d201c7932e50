@rem Shared by the .bat launchers and the installer: paths, the venv's python, dry run.
@rem "call" it, never run it. Settings come from the environment (all optional):
@rem   MESH_VENV      virtual environment (default: .venv in this checkout)
@rem   COMFYUI_PATH   ComfyUI folder (default: what install.bat recorded, else the ComfyUI this
@rem                  pack sits in as a custom node, else .vendor\ComfyUI)
@rem   COMFYUI_TAG    ComfyUI release install.bat/update.bat pin (default v0.28.0)
@rem   MESH_DRY_RUN=1 print every command instead of running it
for %%I in ("%~dp0..") do set "MESH_REPO=%%~fI"
if not defined MESH_VENV set "MESH_VENV=%MESH_REPO%\.venv"
if not defined COMFYUI_TAG set "COMFYUI_TAG=v0.28.0"
if not defined MESH_COMFYUI_URL set "MESH_COMFYUI_URL=https://github.com/Comfy-Org/ComfyUI"
set "PY=%MESH_VENV%\Scripts\python.exe"
set "PYW=%MESH_VENV%\Scripts\pythonw.exe"
set "RUN="
if "%MESH_DRY_RUN%"=="1" set "RUN=echo +"
set "MESH_DEFAULT_DEVICE=cpu"
where nvidia-smi >nul 2>nul && set "MESH_DEFAULT_DEVICE=cuda:0"
set "MESH_COMFY="
if defined COMFYUI_PATH if exist "%COMFYUI_PATH%\comfy\sd.py" set "MESH_COMFY=%COMFYUI_PATH%"
if not defined MESH_COMFY if exist "%MESH_VENV%\comfyui-path.txt" set /p MESH_COMFY=<"%MESH_VENV%\comfyui-path.txt"
if defined MESH_COMFY if not exist "%MESH_COMFY%\comfy\sd.py" set "MESH_COMFY="
if not defined MESH_COMFY if exist "%MESH_REPO%\..\..\comfy\sd.py" for %%I in ("%MESH_REPO%\..\..") do set "MESH_COMFY=%%~fI"
if not defined MESH_COMFY if exist "%MESH_REPO%\.vendor\ComfyUI\comfy\sd.py" set "MESH_COMFY=%MESH_REPO%\.vendor\ComfyUI"
exit /b 0
