# Decides whether the CUDA kernels are built (ROTORQUANT_WITH_CUDA) from
# ROTORQUANT_CUDA = AUTO | ON | OFF, and enables the CUDA language when they are.
include(CheckLanguage)

string(TOUPPER "${ROTORQUANT_CUDA}" _rq_cuda_mode)
set(ROTORQUANT_WITH_CUDA OFF)
if(_rq_cuda_mode STREQUAL "OFF")
  # nothing to do
elseif(_rq_cuda_mode STREQUAL "AUTO" OR _rq_cuda_mode STREQUAL "ON")
  if(NOT CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "${ROTORQUANT_CUDA_ARCHS}")
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    set(ROTORQUANT_WITH_CUDA ON)
  elseif(_rq_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR
      "ROTORQUANT_CUDA=ON but no CUDA compiler (nvcc) was found. Put nvcc on PATH, set "
      "CMAKE_CUDA_COMPILER=/path/to/nvcc or CUDACXX, or configure with -DROTORQUANT_CUDA=AUTO|OFF.")
  else()
    message(STATUS "rotorquant: nvcc not found, building without CUDA (ROTORQUANT_CUDA=AUTO)")
  endif()
else()
  message(FATAL_ERROR "ROTORQUANT_CUDA must be AUTO, ON or OFF; got '${ROTORQUANT_CUDA}'")
endif()
