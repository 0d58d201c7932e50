@echo off
rem Daedalus on the CPU (no GPU needed; slow, for trying the setup). Settings as in daedalus.bat.
setlocal
set "CUDA_VISIBLE_DEVICES="
set "MESH_DEVICE=cpu"
if "%MESH_DRY_RUN%"=="1" echo + set CUDA_VISIBLE_DEVICES=
call "%~dp0daedalus.bat" %*
exit /b %errorlevel%
